//! Secure aggregation of example-weighted updates, after Bonawitz et al. 2017 ("Practical
//! Secure Aggregation for Privacy-Preserving Machine Learning", the semi-honest protocol with
//! dropouts), pure and without network: each party is a state machine that takes the
//! previous step's messages and returns the next step's.
//!
//! One aggregation, for clients `U` (ids unique in the aggregation, chosen by the coordinator):
//! 1. **Advertise keys.** Each client draws two fresh X25519 key pairs, `c` (to seal shares)
//!    and `s` (to agree pairwise masks), and sends both public keys ([`AdvertisedKeys`]).
//!    The coordinator sends the roster of all of them back ([`Coordinator::roster`]).
//! 2. **Share keys.** Each client draws a self-mask seed `b`, Shamir-shares `b` and its mask
//!    secret key `s_sk` (threshold `t` of the roster), and seals one share pair per other
//!    client with ChaCha20-Poly1305 under HKDF-SHA256(X25519(c_u, c_v)), bound to both ids
//!    and the aggregation's context ([`SealedShares`]). The coordinator only routes them.
//! 3. **Masked input.** Each client that received shares from the set `U2` (the clients that
//!    completed step 2, itself included) encodes `n_k * x_k` and `n_k` in fixed point
//!    ([`fixed`]), adds its self mask `PRG(b)` and, for every other `v` in `U2`, the pairwise
//!    mask `+-PRG(HKDF(X25519(s_u, s_v)))` (+ when u < v, - otherwise, so pairs cancel),
//!    PRG being ChaCha20 (`rand_chacha`), and sends the sum ([`MaskedInput`]).
//! 4. **Unmask.** The coordinator names the survivors `U3` (masked input received) and the
//!    dropped `U2 \ U3` ([`UnmaskRequest`]). An honest client answers once per aggregation,
//!    and only if the two sets are disjoint, both inside `U2`, and `|U3| >= t`: with the
//!    self-mask share of every survivor and the key share of every dropped client, never
//!    both for one client (that pair would strip the client's masks and expose its input).
//!    With `t` answers the coordinator rebuilds each survivor's `b` and each dropped
//!    client's `s_sk`, removes the self masks and the dangling pairwise masks, and is left
//!    with the weighted sum and total examples of the survivors ([`UnmaskedSum`]).
//!
//! Left out from the paper: the consistency-check round (signatures over `U3`) that defends
//! against an actively malicious coordinator sending different survivor sets to different
//! clients, and the PKI binding advertised keys to identities (in this federation every call
//! is authenticated by mTLS or a per-organisation token, so the coordinator is trusted to
//! relay keys faithfully).

pub mod fixed;
pub mod round;
pub mod shamir;

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::{CryptoRng, Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

pub use fixed::{EncodeError, FixedPoint};
pub use round::{ClientRound, SecureAggregation, SecureFit, SecureRows, SecureSum};
pub use shamir::{ShamirError, Share};

/// A client's id within one aggregation (its Shamir point is `id + 1`).
pub type ClientId = u32;

/// Settings of the protocol, the same for every party of an aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecAggSettings {
    /// Answers needed to unmask: at least this many clients must survive to the end.
    pub threshold: usize,
    pub fixed_point: FixedPoint,
}

/// Step 1: a client's two public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertisedKeys {
    pub client: ClientId,
    /// Seals the Shamir shares sent to this client.
    pub cipher_public: [u8; 32],
    /// Agrees this client's pairwise masks.
    pub mask_public: [u8; 32],
}

/// Step 2: the shares `from` made for `to`, sealed for `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShares {
    pub from: ClientId,
    pub to: ClientId,
    pub nonce: [u8; 12],
    /// ChaCha20-Poly1305 of the self-mask-seed share and the mask-key share, with the tag.
    pub ciphertext: Vec<u8>,
}

/// Step 3: a client's masked, encoded, weighted update (`dim + 1` ring elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    pub client: ClientId,
    pub values: Vec<u64>,
}

/// Step 4, coordinator to clients: whose self masks and whose mask keys to reveal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub survivors: Vec<ClientId>,
    pub dropped: Vec<ClientId>,
}

/// Step 4, client to coordinator: the answering client's shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskResponse {
    pub from: ClientId,
    /// For each survivor: its self-mask-seed share held by `from`.
    pub self_mask_shares: Vec<(ClientId, Share)>,
    /// For each dropped client: its mask-key share held by `from`.
    pub mask_key_shares: Vec<(ClientId, Share)>,
}

/// A step the coordinator asks of a client, carried by a FIT task of a secure stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecAggTask {
    /// Train on the task's global model, then start an aggregation as `client`.
    Begin {
        client: ClientId,
        threshold: usize,
        frac_bits: u32,
        /// FedE: the update's rows are summed per entity (`None`: the flat model, weighted by
        /// examples).
        rows: Option<SecureRows>,
    },
    /// Step 2: everyone's keys.
    Roster(Vec<AdvertisedKeys>),
    /// Step 3: the shares sealed for this client.
    Inbox(Vec<SealedShares>),
    /// Step 4.
    Unmask(UnmaskRequest),
}

impl SecAggTask {
    pub fn step(&self) -> &'static str {
        match self {
            SecAggTask::Begin { .. } => "begin",
            SecAggTask::Roster(_) => "roster",
            SecAggTask::Inbox(_) => "inbox",
            SecAggTask::Unmask(_) => "unmask",
        }
    }
}

/// A client's answer to a [`SecAggTask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecAggReply {
    Keys(AdvertisedKeys),
    Shares(Vec<SealedShares>),
    Masked(MaskedInput),
    Unmask(UnmaskResponse),
}

impl SecAggReply {
    pub fn step(&self) -> &'static str {
        match self {
            SecAggReply::Keys(_) => "keys",
            SecAggReply::Shares(_) => "shares",
            SecAggReply::Masked(_) => "masked input",
            SecAggReply::Unmask(_) => "unmask",
        }
    }
}

/// The context that salts every key of one aggregation: the run, the stage and the round.
pub fn context(run_id: &str, stage_index: usize, round: u32) -> Vec<u8> {
    format!("simskip secagg/{run_id}/{stage_index}/{round}").into_bytes()
}

/// What the coordinator learns: the survivors' example-weighted sum and their total examples.
#[derive(Debug, Clone, PartialEq)]
pub struct UnmaskedSum {
    pub weighted_sum: Vec<f64>,
    pub total_examples: u64,
    pub survivors: Vec<ClientId>,
}

impl UnmaskedSum {
    /// The example-weighted mean.
    pub fn mean(&self) -> Vec<f64> {
        weighted_mean(&self.weighted_sum, self.total_examples)
    }
}

/// `weighted_sum / total_examples`, element-wise (a zero total divides by 1).
pub(crate) fn weighted_mean(weighted_sum: &[f64], total_examples: u64) -> Vec<f64> {
    let n = total_examples.max(1) as f64;
    weighted_sum.iter().map(|s| s / n).collect()
}

/// Why a step of the protocol was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("threshold {threshold} with {clients} clients: need 2 <= threshold <= clients")]
    Threshold { threshold: usize, clients: usize },
    #[error("the roster {0}")]
    BadRoster(&'static str),
    #[error("a key agreement with client {0} gave a non-contributory (low-order) result")]
    WeakKey(ClientId),
    #[error("shares from client {from} to {to} do not open: {why}")]
    BadShares {
        from: ClientId,
        to: ClientId,
        why: &'static str,
    },
    #[error("only {got} clients completed the step; the threshold is {threshold}")]
    TooFewClients { got: usize, threshold: usize },
    #[error("step {got} is out of order (this party is at {at})")]
    OutOfOrder { at: &'static str, got: &'static str },
    #[error("refused unmask request: {0}")]
    RefusedUnmask(&'static str),
    #[error("message from unknown client {0}")]
    UnknownClient(ClientId),
    #[error("duplicate message from client {0}")]
    Duplicate(ClientId),
    #[error("masked input of client {client} has {got} values; expected {expected}")]
    WrongLength {
        client: ClientId,
        got: usize,
        expected: usize,
    },
    #[error("response from client {from}: {why}")]
    BadResponse { from: ClientId, why: &'static str },
    #[error("rebuilding a secret of client {client}: {source}")]
    Reconstruct {
        client: ClientId,
        #[source]
        source: ShamirError,
    },
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Labels of the HKDF expansions, so that the two derived keys can never coincide.
const INFO_SHARE_KEY: &[u8] = b"simskip secagg v1 share key";
const INFO_MASK_SEED: &[u8] = b"simskip secagg v1 pairwise mask";
/// Plaintext of a sealed share pair: two shares of five field elements.
const SHARE_PLAINTEXT: usize = 2 * shamir::LIMBS * 8;

fn shamir_x(id: ClientId) -> u64 {
    id as u64 + 1
}

fn agree(
    secret: &StaticSecret,
    peer: &[u8; 32],
    peer_id: ClientId,
) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(SecAggError::WeakKey(peer_id));
    }
    Ok(*shared.as_bytes())
}

fn hkdf32(ikm: &[u8; 32], context: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(context), ikm);
    let mut okm = [0u8; 32];
    hk.expand_multi_info(info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The directional key sealing shares from `from` to `to`.
fn share_key(agreed: &[u8; 32], context: &[u8], from: ClientId, to: ClientId) -> [u8; 32] {
    hkdf32(
        agreed,
        context,
        &[INFO_SHARE_KEY, &from.to_le_bytes(), &to.to_le_bytes()],
    )
}

/// The seed of the mask shared by the pair {a, b} (symmetric in a and b).
fn pair_seed(agreed: &[u8; 32], context: &[u8]) -> [u8; 32] {
    hkdf32(agreed, context, &[INFO_MASK_SEED])
}

/// Additional data bound to a sealed share pair.
fn share_aad(context: &[u8], from: ClientId, to: ClientId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(context.len() + 8);
    aad.extend_from_slice(context);
    aad.extend_from_slice(&from.to_le_bytes());
    aad.extend_from_slice(&to.to_le_bytes());
    aad
}

/// Adds (or subtracts) the ChaCha20 stream of `seed` to `values`, element-wise mod 2^64.
fn apply_mask(values: &mut [u64], seed: &[u8; 32], add: bool) {
    let mut prg = ChaCha20Rng::from_seed(*seed);
    for v in values.iter_mut() {
        let m = prg.next_u64();
        *v = if add {
            v.wrapping_add(m)
        } else {
            v.wrapping_sub(m)
        };
    }
}

fn encode_shares(self_mask: &Share, mask_key: &Share) -> [u8; SHARE_PLAINTEXT] {
    let mut out = [0u8; SHARE_PLAINTEXT];
    for (i, v) in self_mask.y.iter().chain(mask_key.y.iter()).enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_shares(x: u64, bytes: &[u8]) -> Option<(Share, Share)> {
    if bytes.len() != SHARE_PLAINTEXT {
        return None;
    }
    let mut limbs = [0u64; 2 * shamir::LIMBS];
    for (i, l) in limbs.iter_mut().enumerate() {
        *l = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().ok()?);
    }
    let mut a = Share {
        x,
        y: [0; shamir::LIMBS],
    };
    let mut b = a;
    a.y.copy_from_slice(&limbs[..shamir::LIMBS]);
    b.y.copy_from_slice(&limbs[shamir::LIMBS..]);
    Some((a, b))
}

fn check_threshold(threshold: usize, clients: usize) -> Result<(), SecAggError> {
    if threshold < 2 || threshold > clients {
        return Err(SecAggError::Threshold { threshold, clients });
    }
    Ok(())
}

/// Where a client is in the protocol.
enum ClientStep {
    Advertised,
    Shared {
        roster: BTreeMap<ClientId, AdvertisedKeys>,
        self_seed: [u8; 32],
        /// This client's own shares of its own secrets (it holds one point like everyone).
        own: (Share, Share),
    },
    Masked {
        /// The clients that completed step 2 (this one included), with the shares of their
        /// self-mask seed and mask key that this client holds.
        held: BTreeMap<ClientId, (Share, Share)>,
    },
    Answered,
}

impl ClientStep {
    fn name(&self) -> &'static str {
        match self {
            ClientStep::Advertised => "advertise keys",
            ClientStep::Shared { .. } => "share keys",
            ClientStep::Masked { .. } => "masked input",
            ClientStep::Answered => "unmask (answered)",
        }
    }
}

/// An organisation's side of one aggregation. Build a new one (fresh keys) every aggregation.
pub struct SecAggClient {
    id: ClientId,
    settings: SecAggSettings,
    context: Vec<u8>,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    step: ClientStep,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("id", &self.id)
            .field("step", &self.step.name())
            .finish_non_exhaustive()
    }
}

impl SecAggClient {
    /// Step 1: draws the aggregation's key pairs. `context` names the aggregation (run,
    /// stage, round) and must be the same for every party; it salts every derived key.
    pub fn new<R: CryptoRng>(
        id: ClientId,
        settings: SecAggSettings,
        context: &[u8],
        rng: &mut R,
    ) -> (Self, AdvertisedKeys) {
        let cipher_secret = StaticSecret::from(rng.random::<[u8; 32]>());
        let mask_secret = StaticSecret::from(rng.random::<[u8; 32]>());
        let keys = AdvertisedKeys {
            client: id,
            cipher_public: PublicKey::from(&cipher_secret).to_bytes(),
            mask_public: PublicKey::from(&mask_secret).to_bytes(),
        };
        let client = SecAggClient {
            id,
            settings,
            context: context.to_vec(),
            cipher_secret,
            mask_secret,
            step: ClientStep::Advertised,
        };
        (client, keys)
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Step 2: checks the roster, shares this client's secrets among it and seals each
    /// other member's pair of shares for that member.
    pub fn share_keys<R: CryptoRng>(
        &mut self,
        roster: &[AdvertisedKeys],
        rng: &mut R,
    ) -> Result<Vec<SealedShares>, SecAggError> {
        if !matches!(self.step, ClientStep::Advertised) {
            return Err(SecAggError::OutOfOrder {
                at: self.step.name(),
                got: "share keys",
            });
        }
        check_threshold(self.settings.threshold, roster.len())?;
        let mut by_id = BTreeMap::new();
        let mut publics = BTreeSet::new();
        for k in roster {
            if by_id.insert(k.client, *k).is_some() {
                return Err(SecAggError::BadRoster("names a client twice"));
            }
            // Two clients with one key would be one client speaking twice.
            if !publics.insert(k.cipher_public) || !publics.insert(k.mask_public) {
                return Err(SecAggError::BadRoster("repeats a public key"));
            }
        }
        let mine = by_id
            .get(&self.id)
            .ok_or(SecAggError::BadRoster("does not list this client"))?;
        if mine.cipher_public != PublicKey::from(&self.cipher_secret).to_bytes()
            || mine.mask_public != PublicKey::from(&self.mask_secret).to_bytes()
        {
            return Err(SecAggError::BadRoster("lists other keys for this client"));
        }

        let self_seed: [u8; 32] = rng.random();
        let xs: Vec<u64> = by_id.keys().map(|&id| shamir_x(id)).collect();
        let t = self.settings.threshold;
        let seed_shares = shamir::split(&self_seed, t, &xs, rng);
        let key_shares = shamir::split(&self.mask_secret.to_bytes(), t, &xs, rng);

        let mut sealed = Vec::with_capacity(by_id.len() - 1);
        let mut own = None;
        for ((&to, peer), (seed_share, key_share)) in
            by_id.iter().zip(seed_shares.iter().zip(&key_shares))
        {
            if to == self.id {
                own = Some((*seed_share, *key_share));
                continue;
            }
            let agreed = agree(&self.cipher_secret, &peer.cipher_public, to)?;
            let key = share_key(&agreed, &self.context, self.id, to);
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
            let nonce: [u8; 12] = rng.random();
            let plaintext = encode_shares(seed_share, key_share);
            let ciphertext = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    AeadPayload {
                        msg: &plaintext,
                        aad: &share_aad(&self.context, self.id, to),
                    },
                )
                .expect("sealing a short buffer cannot fail");
            sealed.push(SealedShares {
                from: self.id,
                to,
                nonce,
                ciphertext,
            });
        }
        self.step = ClientStep::Shared {
            roster: by_id,
            self_seed,
            own: own.expect("this client is in the roster"),
        };
        Ok(sealed)
    }

    /// Step 3: opens the shares addressed to this client (their senders, with this client,
    /// are `U2`), then masks and returns its encoded `examples * update` and `examples`.
    pub fn masked_input(
        &mut self,
        inbox: &[SealedShares],
        update: &[f32],
        examples: u64,
    ) -> Result<MaskedInput, SecAggError> {
        let ClientStep::Shared {
            roster,
            self_seed,
            own,
        } = &self.step
        else {
            return Err(SecAggError::OutOfOrder {
                at: self.step.name(),
                got: "masked input",
            });
        };
        let mut held = BTreeMap::new();
        held.insert(self.id, *own);
        for s in inbox {
            let bad = |why| SecAggError::BadShares {
                from: s.from,
                to: s.to,
                why,
            };
            if s.to != self.id {
                return Err(bad("addressed to another client"));
            }
            let peer = roster.get(&s.from).ok_or(bad("sender not in the roster"))?;
            if held.contains_key(&s.from) {
                return Err(bad("a second set from the same sender"));
            }
            let agreed = agree(&self.cipher_secret, &peer.cipher_public, s.from)?;
            let key = share_key(&agreed, &self.context, s.from, self.id);
            let plaintext = ChaCha20Poly1305::new(Key::from_slice(&key))
                .decrypt(
                    Nonce::from_slice(&s.nonce),
                    AeadPayload {
                        msg: &s.ciphertext,
                        aad: &share_aad(&self.context, s.from, self.id),
                    },
                )
                .map_err(|_| bad("authentication failed"))?;
            let pair = decode_shares(shamir_x(self.id), &plaintext).ok_or(bad("wrong length"))?;
            held.insert(s.from, pair);
        }
        if held.len() < self.settings.threshold {
            return Err(SecAggError::TooFewClients {
                got: held.len(),
                threshold: self.settings.threshold,
            });
        }

        let mut values =
            self.settings
                .fixed_point
                .encode_weighted(update, examples, roster.len())?;
        apply_mask(&mut values, self_seed, true);
        for &v in held.keys().filter(|&&v| v != self.id) {
            let agreed = agree(&self.mask_secret, &roster[&v].mask_public, v)?;
            apply_mask(&mut values, &pair_seed(&agreed, &self.context), self.id < v);
        }
        self.step = ClientStep::Masked { held };
        Ok(MaskedInput {
            client: self.id,
            values,
        })
    }

    /// Step 4: reveals the shares the coordinator needs, once, and never both shares of one
    /// client.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        let ClientStep::Masked { held } = &self.step else {
            return Err(match self.step {
                ClientStep::Answered => SecAggError::RefusedUnmask("already answered"),
                _ => SecAggError::OutOfOrder {
                    at: self.step.name(),
                    got: "unmask",
                },
            });
        };
        let survivors: BTreeSet<ClientId> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<ClientId> = request.dropped.iter().copied().collect();
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(SecAggError::RefusedUnmask("a client is named twice"));
        }
        if !survivors.is_disjoint(&dropped) {
            return Err(SecAggError::RefusedUnmask(
                "a client is named both survivor and dropped",
            ));
        }
        if survivors
            .iter()
            .chain(&dropped)
            .any(|c| !held.contains_key(c))
        {
            return Err(SecAggError::RefusedUnmask(
                "names a client that did not share keys",
            ));
        }
        if survivors.len() + dropped.len() != held.len() {
            return Err(SecAggError::RefusedUnmask(
                "leaves out a client that shared keys",
            ));
        }
        if survivors.len() < self.settings.threshold {
            return Err(SecAggError::RefusedUnmask(
                "fewer survivors than the threshold",
            ));
        }
        if !survivors.contains(&self.id) {
            return Err(SecAggError::RefusedUnmask("this client is not a survivor"));
        }
        let response = UnmaskResponse {
            from: self.id,
            self_mask_shares: survivors.iter().map(|c| (*c, held[c].0)).collect(),
            mask_key_shares: dropped.iter().map(|c| (*c, held[c].1)).collect(),
        };
        // One answer per aggregation: a second request could ask, for a client named
        // survivor now, its key share by naming it dropped then.
        self.step = ClientStep::Answered;
        Ok(response)
    }
}

/// Where the coordinator is in the protocol: what it collects now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoordinatorStep {
    Keys,
    Shares,
    Inputs,
    Responses,
}

/// The coordinator's side of one aggregation: it relays keys and sealed shares, adds masked
/// inputs, and with enough answers removes the masks. It never sees an unmasked update.
#[derive(Debug)]
pub struct Coordinator {
    settings: SecAggSettings,
    context: Vec<u8>,
    dim: usize,
    step: CoordinatorStep,
    keys: BTreeMap<ClientId, AdvertisedKeys>,
    /// U2: senders of step 2, with what they sealed for each recipient.
    shares: BTreeMap<ClientId, Vec<SealedShares>>,
    /// U3 and the running masked sum.
    inputs: BTreeSet<ClientId>,
    masked_sum: Vec<u64>,
    responses: BTreeMap<ClientId, UnmaskResponse>,
}

impl Coordinator {
    /// An aggregation of `dim`-long updates.
    pub fn new(settings: SecAggSettings, context: &[u8], dim: usize) -> Self {
        Coordinator {
            settings,
            context: context.to_vec(),
            dim,
            step: CoordinatorStep::Keys,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            inputs: BTreeSet::new(),
            masked_sum: vec![0; dim + 1],
            responses: BTreeMap::new(),
        }
    }

    fn expect(&self, step: CoordinatorStep, got: &'static str) -> Result<(), SecAggError> {
        if self.step != step {
            return Err(SecAggError::OutOfOrder {
                at: match self.step {
                    CoordinatorStep::Keys => "advertise keys",
                    CoordinatorStep::Shares => "share keys",
                    CoordinatorStep::Inputs => "masked input",
                    CoordinatorStep::Responses => "unmask",
                },
                got,
            });
        }
        Ok(())
    }

    /// Ring elements in every masked input: the update's length, then the examples.
    pub fn masked_len(&self) -> usize {
        self.dim + 1
    }

    /// Step 1 in: one client's keys.
    pub fn on_keys(&mut self, keys: AdvertisedKeys) -> Result<(), SecAggError> {
        self.expect(CoordinatorStep::Keys, "advertise keys")?;
        if self.keys.insert(keys.client, keys).is_some() {
            return Err(SecAggError::Duplicate(keys.client));
        }
        Ok(())
    }

    /// Step 1 out: closes key collection and returns the roster every client receives.
    pub fn roster(&mut self) -> Result<Vec<AdvertisedKeys>, SecAggError> {
        self.expect(CoordinatorStep::Keys, "roster")?;
        check_threshold(self.settings.threshold, self.keys.len())?;
        self.step = CoordinatorStep::Shares;
        Ok(self.keys.values().copied().collect())
    }

    /// Step 2 in: what `from` sealed for the others (checked to come from `from`, to go to
    /// roster members, one set per recipient).
    pub fn on_shares(
        &mut self,
        from: ClientId,
        sealed: Vec<SealedShares>,
    ) -> Result<(), SecAggError> {
        self.expect(CoordinatorStep::Shares, "share keys")?;
        if !self.keys.contains_key(&from) {
            return Err(SecAggError::UnknownClient(from));
        }
        if self.shares.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let mut recipients = BTreeSet::new();
        for s in &sealed {
            if s.from != from || s.to == from || !self.keys.contains_key(&s.to) {
                return Err(SecAggError::BadShares {
                    from: s.from,
                    to: s.to,
                    why: "wrong sender or recipient",
                });
            }
            if !recipients.insert(s.to) {
                return Err(SecAggError::BadShares {
                    from: s.from,
                    to: s.to,
                    why: "two sets for one recipient",
                });
            }
        }
        if recipients.len() + 1 != self.keys.len() {
            return Err(SecAggError::BadShares {
                from,
                to: from,
                why: "not one set for every other roster member",
            });
        }
        self.shares.insert(from, sealed);
        Ok(())
    }

    /// Step 2 out: closes share collection (`U2` = the senders so far).
    pub fn close_shares(&mut self) -> Result<(), SecAggError> {
        self.expect(CoordinatorStep::Shares, "close shares")?;
        if self.shares.len() < self.settings.threshold {
            return Err(SecAggError::TooFewClients {
                got: self.shares.len(),
                threshold: self.settings.threshold,
            });
        }
        self.step = CoordinatorStep::Inputs;
        Ok(())
    }

    /// The clients that completed step 2 (`U2`).
    pub fn shared(&self) -> Vec<ClientId> {
        self.shares.keys().copied().collect()
    }

    /// Step 2 out, per client: the sealed shares addressed to `to` by members of `U2`.
    pub fn inbox(&self, to: ClientId) -> Vec<SealedShares> {
        self.shares
            .values()
            .flat_map(|v| v.iter().filter(|s| s.to == to).cloned())
            .collect()
    }

    /// Step 3 in: one client's masked input, added to the running sum at once.
    pub fn on_masked_input(&mut self, input: MaskedInput) -> Result<(), SecAggError> {
        self.expect(CoordinatorStep::Inputs, "masked input")?;
        if !self.shares.contains_key(&input.client) {
            return Err(SecAggError::UnknownClient(input.client));
        }
        if input.values.len() != self.dim + 1 {
            return Err(SecAggError::WrongLength {
                client: input.client,
                got: input.values.len(),
                expected: self.dim + 1,
            });
        }
        if !self.inputs.insert(input.client) {
            return Err(SecAggError::Duplicate(input.client));
        }
        for (s, v) in self.masked_sum.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v);
        }
        Ok(())
    }

    /// Step 3 out: closes input collection; the request every survivor receives.
    pub fn unmask_request(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect(CoordinatorStep::Inputs, "unmask request")?;
        if self.inputs.len() < self.settings.threshold {
            return Err(SecAggError::TooFewClients {
                got: self.inputs.len(),
                threshold: self.settings.threshold,
            });
        }
        self.step = CoordinatorStep::Responses;
        Ok(self.current_request())
    }

    fn current_request(&self) -> UnmaskRequest {
        UnmaskRequest {
            survivors: self.inputs.iter().copied().collect(),
            dropped: self
                .shares
                .keys()
                .filter(|c| !self.inputs.contains(c))
                .copied()
                .collect(),
        }
    }

    /// Step 4 in: one survivor's answer (checked to cover exactly the request).
    pub fn on_unmask_response(&mut self, response: UnmaskResponse) -> Result<(), SecAggError> {
        self.expect(CoordinatorStep::Responses, "unmask response")?;
        let from = response.from;
        if !self.inputs.contains(&from) {
            return Err(SecAggError::UnknownClient(from));
        }
        if self.responses.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let request = self.current_request();
        let x = shamir_x(from);
        let covers = |got: &[(ClientId, Share)], want: &[ClientId]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|((c, share), w)| c == w && share.x == x)
        };
        if !covers(&response.self_mask_shares, &request.survivors)
            || !covers(&response.mask_key_shares, &request.dropped)
        {
            return Err(SecAggError::BadResponse {
                from,
                why: "does not answer the request",
            });
        }
        self.responses.insert(from, response);
        Ok(())
    }

    /// Whether enough answers arrived to unmask.
    pub fn can_finish(&self) -> bool {
        self.step == CoordinatorStep::Responses && self.responses.len() >= self.settings.threshold
    }

    /// Step 4 out: removes every mask and decodes the survivors' weighted sum.
    pub fn finish(&self) -> Result<UnmaskedSum, SecAggError> {
        self.expect(CoordinatorStep::Responses, "finish")?;
        let t = self.settings.threshold;
        if self.responses.len() < t {
            return Err(SecAggError::TooFewClients {
                got: self.responses.len(),
                threshold: t,
            });
        }
        let request = self.current_request();
        let mut sum = self.masked_sum.clone();
        for (i, &u) in request.survivors.iter().enumerate() {
            let shares: Vec<Share> = self
                .responses
                .values()
                .map(|r| r.self_mask_shares[i].1)
                .collect();
            let seed = shamir::combine(&shares, t)
                .map_err(|source| SecAggError::Reconstruct { client: u, source })?;
            apply_mask(&mut sum, &seed, false);
        }
        for (i, &u) in request.dropped.iter().enumerate() {
            let shares: Vec<Share> = self
                .responses
                .values()
                .map(|r| r.mask_key_shares[i].1)
                .collect();
            let secret = StaticSecret::from(
                shamir::combine(&shares, t)
                    .map_err(|source| SecAggError::Reconstruct { client: u, source })?,
            );
            if PublicKey::from(&secret).to_bytes() != self.keys[&u].mask_public {
                return Err(SecAggError::Reconstruct {
                    client: u,
                    source: ShamirError::NotASecret,
                });
            }
            for &v in &request.survivors {
                let agreed = agree(&secret, &self.keys[&v].mask_public, v)?;
                // Survivor v added the pair's stream when v < u and subtracted it otherwise;
                // undo that.
                apply_mask(&mut sum, &pair_seed(&agreed, &self.context), v > u);
            }
        }
        let (weighted_sum, total_examples) = self.settings.fixed_point.decode_sum(&sum);
        Ok(UnmaskedSum {
            weighted_sum,
            total_examples,
            survivors: request.survivors,
        })
    }
}

/// Runs one whole aggregation in process (no network): every client in `updates` takes part;
/// those in `drop_after_shares` stop after step 2 (their masked input never arrives). For
/// tests, benchmarks and the in-process simulation.
pub fn aggregate_in_process<R: CryptoRng>(
    settings: SecAggSettings,
    context: &[u8],
    updates: &[(Vec<f32>, u64)],
    drop_after_shares: &[ClientId],
    rng: &mut R,
) -> Result<UnmaskedSum, SecAggError> {
    let dim = updates.first().map_or(0, |u| u.0.len());
    let mut coordinator = Coordinator::new(settings, context, dim);
    let mut clients = Vec::with_capacity(updates.len());
    for id in 0..updates.len() as ClientId {
        let (client, keys) = SecAggClient::new(id, settings, context, rng);
        coordinator.on_keys(keys)?;
        clients.push(client);
    }
    let roster = coordinator.roster()?;
    for c in &mut clients {
        let sealed = c.share_keys(&roster, rng)?;
        coordinator.on_shares(c.id(), sealed)?;
    }
    coordinator.close_shares()?;
    for (c, (update, examples)) in clients.iter_mut().zip(updates) {
        let masked = c.masked_input(&coordinator.inbox(c.id()), update, *examples)?;
        if !drop_after_shares.contains(&c.id()) {
            coordinator.on_masked_input(masked)?;
        }
    }
    let request = coordinator.unmask_request()?;
    for c in clients
        .iter_mut()
        .filter(|c| !drop_after_shares.contains(&c.id()))
    {
        coordinator.on_unmask_response(c.unmask(&request)?)?;
    }
    coordinator.finish()
}

#[cfg(test)]
mod tests;
