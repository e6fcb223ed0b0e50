"""PyKEEN TransE on UMLS with the settings of the product's `TransEConfig::default()`.

d 128, L1, margin ranking loss (margin 1, mean), 1 negative per positive (head or tail,
uniform), batch 256, Adam lr 0.01, 100 epochs, entities projected to unit L2 norm after every
step (PyKEEN's TransE default constrainer). Filtered test MRR and Hits@k, both sides,
realistic rank (PyKEEN's default), on the repository's data/umls files. Prints one JSON line
per seed. Used by scripts/peer-pykeen.sh.

    python peer_pykeen_umls.py DATA_DIR SEED [SEED ...]
"""

import json
import sys
import time

import torch
from pykeen.evaluation import RankBasedEvaluator
from pykeen.models import TransE
from pykeen.training import SLCWATrainingLoop
from pykeen.triples import TriplesFactory
from pykeen.version import get_version


def main() -> None:
    data, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
    torch.set_num_threads(1)
    train = TriplesFactory.from_path(f"{data}/train.tsv")
    valid = TriplesFactory.from_path(
        f"{data}/valid.tsv",
        entity_to_id=train.entity_to_id,
        relation_to_id=train.relation_to_id,
    )
    test = TriplesFactory.from_path(
        f"{data}/test.tsv",
        entity_to_id=train.entity_to_id,
        relation_to_id=train.relation_to_id,
    )
    for seed in seeds:
        torch.manual_seed(seed)
        model = TransE(
            triples_factory=train,
            embedding_dim=128,
            scoring_fct_norm=1,
            loss="marginranking",
            loss_kwargs=dict(margin=1.0),
            random_seed=seed,
        )
        optimizer = torch.optim.Adam(params=model.get_grad_params(), lr=0.01)
        loop = SLCWATrainingLoop(
            model=model,
            triples_factory=train,
            optimizer=optimizer,
            negative_sampler="basic",
            negative_sampler_kwargs=dict(num_negs_per_pos=1),
        )
        t0 = time.perf_counter()
        c0 = time.process_time()
        loop.train(
            triples_factory=train,
            num_epochs=100,
            batch_size=256,
            use_tqdm=False,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = RankBasedEvaluator(filtered=True).evaluate(
            model,
            test.mapped_triples,
            additional_filter_triples=[train.mapped_triples, valid.mapped_triples],
            use_tqdm=False,
        )
        get = lambda m: float(result.get_metric(f"both.realistic.{m}"))
        print(
            json.dumps(
                dict(
                    peer="pykeen",
                    version=get_version(),
                    seed=seed,
                    mrr=get("inverse_harmonic_mean_rank"),
                    h1=get("hits_at_1"),
                    h10=get("hits_at_10"),
                    wall_s=wall,
                    cpu_s=cpu,
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
