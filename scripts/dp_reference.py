"""Reference epsilons for the Renyi-DP accountant's tests (crates/simskip-fed/src/accountant.rs).

Google's `dp-accounting` (the TensorFlow Privacy accountant) composes a Poisson-subsampled
Gaussian mechanism `steps` times and converts to (epsilon, delta) over its default orders.
Regenerate with:

    python3 -m venv /tmp/dp-venv && /tmp/dp-venv/bin/pip install dp-accounting==0.6.0
    /tmp/dp-venv/bin/python scripts/dp_reference.py

and paste the printed rows into the test's REFERENCE table.
"""

import importlib.metadata
import logging

import dp_accounting

# (sampling rate q, noise multiplier sigma, steps, delta)
CASES = [
    (0.01, 1.1, 1000, 1e-5),
    (256 / 60000, 1.1, 60 * 60000 // 256, 1e-5),
    (1.0, 1.0, 10, 1e-5),
    (1.0, 4.0, 50, 1e-6),
    (0.3, 0.8, 50, 1e-6),
    (0.05, 2.0, 100, 1e-5),
    (0.5, 5.0, 20, 1e-5),
    (0.001, 0.7, 10000, 1e-6),
    (2 / 3, 1.5, 30, 1e-5),
]


def epsilon(q, sigma, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


if __name__ == "__main__":
    # Orders whose fractional series does not converge are skipped by the library (and by
    # ours, alike); silence its warnings about them.
    logging.getLogger("absl").setLevel(logging.ERROR)
    print(f"// dp-accounting {importlib.metadata.version('dp-accounting')}")
    print("// (q, sigma, steps, delta, epsilon)")
    for q, sigma, steps, delta in CASES:
        print(f"    ({q!r}, {sigma!r}, {steps}, {delta!r}, {epsilon(q, sigma, steps, delta)!r}),")
