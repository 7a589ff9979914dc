"""Collapse diagnostics: pure functions on embeddings, and an online monitor that warns when a run collapses.

A collapsing SSL run maps every image to (nearly) the same point, or to a low-dimensional subspace. The
contrastive losses then sit at their "uniform" value (all logits equal: ln(K+1) for MoCo), the pretext accuracy
falls and the backbone ends worse than random init, with nothing in the loss curve that a user would read as an
error. Two statistics expose it early, on the embeddings the loss sees:

* :func:`embedding_std` -- mean over dimensions of the per-dimension batch std of L2-normalised rows (the
  SimSiam paper's collapse monitor, Chen & He 2021, sec. 4.1): ~1/sqrt(d) for isotropic embeddings, 0 when
  every row is the same.
* :func:`effective_rank` -- RankMe (Garrido et al., ICML 2023, arXiv:2210.02885): exp of the entropy of the
  normalised singular values; between 1 (rank-1 / collapsed) and min(N, d).

:func:`alignment` and :func:`uniformity` are Wang & Isola's (ICML 2020, arXiv:2005.10242) two properties of
contrastive embeddings, written for rows that are already L2-normalised (as in their reference code).

:class:`CollapseMonitor` keeps the last few batches' embeddings (bounded, detached) and turns these statistics
into one warning line per collapse episode. All functions take tensors on any device and do no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # RankMe's epsilon (Garrido et al. 2023, eq. 1): keeps p log p finite for zero singular values


# ------------------------------------------------------------------------------------------- pure statistics
@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the (unbiased) batch std of ``normalize(z)``. z: (N, d), N >= 2.

    ~1/sqrt(d) for isotropic embeddings (each coordinate of a random unit vector has variance 1/d); 0 when all
    rows point the same way. Compare it with ``1 / sqrt(d)``.
    """
    _check_2d(z, "embedding_std", min_rows=2)
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe effective rank of z (N, d): ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum(sigma) + eps``.

    sigma are the singular values of z as given (not centred, not normalised, as in RankMe). Lies in [1, min(N, d)]
    up to ``eps`` terms (a rank-1 matrix gives 1 + O(min(N, d) * eps * log(1/eps)), i.e. 1.0003 at d=128);
    an all-zero matrix gives 0. sigma^2 are the eigenvalues of the smaller Gram matrix (z z^T or z^T z) in float64
    on z's device (several times cheaper than an SVD on CPU); eigenvalues under ``min(N, d) * 1e-15 * max`` are
    float64 round-off and count as 0.
    """
    _check_2d(z, "effective_rank", min_rows=1)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    z = z.detach().double()
    gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    lam = torch.linalg.eigvalsh(gram)
    top = lam.max()
    if not bool(top > 0):
        return 0.0
    lam = torch.where(lam > min(z.shape) * 1e-15 * top, lam, torch.zeros_like(lam))
    s = lam.sqrt()
    p = s / s.sum() + eps
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # xlogy: 0 log 0 = 0 when eps = 0


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment ``E_i ||z1_i - z2_i||^alpha`` over positive pairs; z1, z2 (N, d), L2-normalised.

    0 for identical pairs; with alpha = 2 it is ``2 - 2 cos`` on average, in [0, 4].
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"alignment needs paired (N, d) tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return float((z1.double() - z2.double()).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0, chunk: int = 4096) -> float:
    """Wang & Isola's uniformity ``log mean_{i<j} exp(-t ||z_i - z_j||^2)``; z (N, d), L2-normalised, N >= 2.

    Exact over all N(N-1)/2 distinct pairs, in float64 with a log-sum-exp, ``chunk`` rows at a time so memory stays
    O(chunk * N). 0 when collapsed (all rows equal); more negative is more uniform (-4 at t=2 is the limit for
    antipodal pairs; about -3.8 for many points spread over a high-dimensional sphere).
    """
    _check_2d(z, "uniformity", min_rows=2)
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    z = z.detach().double()
    n, sq = z.shape[0], z.pow(2).sum(1)
    parts = []
    for i0 in range(0, n - 1, chunk):
        rows = z[i0:i0 + chunk]
        d2 = (sq[i0:i0 + chunk, None] + sq[None, :] - 2 * rows @ z.T).clamp_min_(0)  # chunk x N squared distances
        i = torch.arange(i0, i0 + rows.shape[0], device=z.device)[:, None]
        j = torch.arange(n, device=z.device)[None, :]
        parts.append(torch.logsumexp((-t * d2).masked_fill(j <= i, float("-inf")).flatten(), 0))  # pairs i < j
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1) / 2))


def _check_2d(z: torch.Tensor, what: str, min_rows: int) -> None:
    if z.dim() != 2 or z.shape[0] < min_rows or z.shape[1] < 1:
        raise ValueError(f"{what} needs an (N, d) tensor with N >= {min_rows} rows, got shape {tuple(z.shape)}")


# ------------------------------------------------------------------------------------------- loss at collapse
def collapse_value(method_name: str, **hparams) -> float | None:
    """The loss a method reports when every embedding is the same (its "uniform" or trivial solution).

    * ``moco`` (``K`` = queue size): all K+1 logits equal -> ln(K+1); ``symmetric=True`` (the summed two-direction
      loss of ``--moco-symmetric``) -> 2 ln(K+1).
    * ``simclr`` (``batch_size`` = global N images, 2N embeddings): NT-Xent over 2N-1 candidates -> ln(2N-1).
    * ``swav`` -> None: with one embedding for every image the Sinkhorn codes are uniform and the loss is
      ``ln(K) + KL(uniform || softmax(z.c / T))`` >= ln(K), which depends on the prototypes.
    * ``byol`` -> 0 and ``simsiam`` -> -1 (their minimum: a collapsed run looks *perfect* in the loss).
    * ``barlow`` (``dim`` = projector output width): standardised constant embeddings give C = 0 -> loss = d.
    * ``seed`` -> None (the value depends on the teacher, which does not collapse).
    Returns None when the value is unknown or a needed hyperparameter is missing.
    """
    name = method_name.lower()
    if name == "moco":
        if "K" not in hparams:
            return None
        return math.log(int(hparams["K"]) + 1) * (2 if hparams.get("symmetric") else 1)
    if name == "simclr":
        n = hparams.get("batch_size")
        return math.log(2 * int(n) - 1) if n is not None and int(n) >= 1 else None
    if name == "byol":
        return 0.0
    if name == "simsiam":
        return -1.0
    if name == "barlow":
        d = hparams.get("dim")
        return float(d) if d is not None else None
    return None


def is_collapsed_loss(loss: float | None, value: float | None, rel: float = 0.02) -> bool:
    """True when ``loss`` is within ``rel`` (relative, of |value|; absolute ``rel`` when value is 0) of ``value``.

    For compare_methods' table: a MoCo run whose final loss is within 2% of ln(K+1) learned (almost) nothing.
    Meaningful for methods whose collapse value is a maximum (moco, simclr); for byol / simsiam the collapse
    value is also the optimum, so a low loss alone proves nothing there (use the embedding statistics).
    """
    if loss is None or value is None or not math.isfinite(loss):
        return False
    if rel < 0:
        raise ValueError(f"rel must be >= 0, got {rel}")
    return abs(loss - value) <= rel * (abs(value) if value != 0 else 1.0)


# ------------------------------------------------------------------------------------------- online monitor
#: The collapse warning's advice where a method names no better one (``SSLMethod.collapse_hint``).
DEFAULT_COLLAPSE_HINT = "Runs usually recover with a lower lr (or predictor lr), a larger batch, or a lower temperature"


class CollapseMonitor:
    """Collapse statistics over the last ``history`` batches and a once-per-episode warning.

    Call :meth:`update` every step (or every print step) with the embeddings the loss sees, :meth:`stats` at print
    steps for ``log.jsonl``, and :meth:`check` right after it. A *check* is low when

    * ``emb_std < std_floor / sqrt(d)`` (absolute: the isotropic value is 1/sqrt(d)), or
    * ``emb_std`` or ``emb_rank`` is below ``drop`` times its own peak so far (relative to the run's healthy value:
      random-init embeddings are far from isotropic, so an absolute rank threshold would either miss a collapse
      or warn at init).

    After ``patience`` consecutive low checks :meth:`check` returns one warning line; it stays silent until a
    check is healthy again (the episode ends) and may then warn once more. No check is judged before the buffer
    holds ``history`` batches.

    Where the defaults come from (ResNet-18, CIFAR-10 at 32 px, 2-core CPU, measured once): random-init MoCo v2
    embeddings (CIFAR stem, no augmentation, 256 rows) sit at ``emb_std`` 0.26-0.33 x 1/sqrt(d) and RankMe 51-59 of
    128, so an absolute floor has to stay well under 0.26. Batch 64, ImageNet stem, checks every 3 steps: healthy
    SimSiam (lr 0.05) keeps RankMe >= 0.86 of its peak over 45 steps (std >= 0.98 of peak); SimSiam without
    stop-gradient falls to 0.12 of its RankMe peak by step 27 (std stays 0.56-0.68 x 1/sqrt(d), held up by the
    projector's output BatchNorm), warned at step 27; MoCo with the short-CPU recipe (K=512, m=0.9, T=0.2,
    symmetric, lr 0.02) falls to uniformity -0.03, std 0.08 x 1/sqrt(d) and RankMe 0.15 of its peak by step 15,
    warned at step 18 (its random-init step-0 std was 0.65 x 1/sqrt(d)).

    Args:
        history: batches kept for the rank (RankMe needs more rows than dimensions to reach d).
        patience: consecutive low checks before the warning (one noisy print does not warn).
        std_floor: absolute floor of ``emb_std * sqrt(d)``.
        drop: relative floor of ``emb_std`` and ``emb_rank`` against their peaks.
        eps: RankMe's epsilon.
        hint: the warning's last sentence, what to change (the trainer passes the method's ``collapse_hint``).
    """

    def __init__(self, history: int = 2, patience: int = 3, std_floor: float = 0.05, drop: float = 0.3,
                 eps: float = RANKME_EPS, hint: str = DEFAULT_COLLAPSE_HINT):
        if history < 1 or patience < 1:
            raise ValueError(f"history and patience must be >= 1, got history={history}, patience={patience}")
        if not 0 <= std_floor < 1 or not 0 <= drop < 1:
            raise ValueError(f"std_floor and drop must be in [0, 1), got std_floor={std_floor}, drop={drop}")
        self.history, self.patience, self.std_floor, self.drop, self.eps = history, patience, std_floor, drop, eps
        self.hint = hint
        self._emb: deque[list[torch.Tensor]] = deque(maxlen=history)  # per batch: the views, each (B, d)
        self._feat: deque[torch.Tensor] = deque(maxlen=history)  # per batch: (B, F)
        self._cached: dict[str, float] | None = None
        self.peak: dict[str, float] = {}
        self.low_streak, self.warned = 0, False

    @torch.no_grad()
    def update(self, emb_views: Sequence[torch.Tensor], features: torch.Tensor | None = None) -> None:
        """Keep this batch. emb_views: V >= 1 tensors (B, d) (the embeddings the loss sees, before or after
        normalisation); features: backbone features (B, F) of the first view, or None. Stored detached, float32, on
        the input's device; the buffer holds ``history`` batches."""
        views = list(emb_views)
        if not views or any(v.dim() != 2 or v.shape[1] != views[0].shape[1] for v in views):
            raise ValueError(f"emb_views must be a non-empty list of (B, d) tensors with one d, got "
                             f"{[tuple(v.shape) for v in views]}")
        if self._emb and self._emb[-1][0].shape[1] != views[0].shape[1]:
            raise ValueError(f"embedding width changed from {self._emb[-1][0].shape[1]} to {views[0].shape[1]}")
        self._emb.append([v.detach().float() for v in views])
        if features is not None:
            if features.dim() != 2:
                raise ValueError(f"features must be (B, F), got shape {tuple(features.shape)}")
            self._feat.append(features.detach().float())
        self._cached = None

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Statistics of the buffer (empty dict before the first update). Keys:

        * ``emb_std``: :func:`embedding_std` of the latest batch's first view; ``emb_std_ref`` = 1/sqrt(d).
        * ``emb_rank``: RankMe of every view of the buffered batches (rows stacked); ``emb_rank_max`` = min(rows, d).
          Present once the buffer holds ``history`` batches (a part-filled one has fewer rows, a lower rank).
        * ``feat_rank``: RankMe of the buffered backbone features (once ``history`` batches came with features).
        * ``align``: alignment (alpha=2) of the first two views of the latest batch, normalised (needs V >= 2).
        * ``unif``: uniformity (t=2) of the latest batch's first view, normalised.
        """
        if self._cached is not None:
            return dict(self._cached)
        if not self._emb:
            return {}
        last = self._emb[-1]
        d = last[0].shape[1]
        out: dict[str, float] = {"emb_std": embedding_std(last[0]) if last[0].shape[0] > 1 else float("nan"),
                                 "emb_std_ref": 1.0 / math.sqrt(d)}
        if len(self._emb) == self.history:  # a part-filled buffer has fewer rows: its rank is not comparable
            rows = torch.cat([v for batch in self._emb for v in batch])
            out.update(emb_rank=effective_rank(rows, self.eps), emb_rank_max=float(min(rows.shape)))
        if len(self._feat) == self.history:
            out["feat_rank"] = effective_rank(torch.cat(list(self._feat)), self.eps)
        first = F.normalize(last[0], dim=1)
        if len(last) >= 2 and last[1].shape == last[0].shape:
            out["align"] = alignment(first, F.normalize(last[1], dim=1))
        if first.shape[0] > 1:
            out["unif"] = uniformity(first)
        self._cached = out
        return dict(out)

    def check(self, step: int) -> str | None:
        """Judge the current :meth:`stats`; return one warning line when a collapse episode starts, else None."""
        s = self.stats()
        if len(self._emb) < self.history or not math.isfinite(s["emb_std"]):
            return None  # the rank of a part-filled buffer has fewer rows: not comparable with the peak
        for key in ("emb_std", "emb_rank"):
            self.peak[key] = max(self.peak.get(key, 0.0), s[key])
        std_ratio = s["emb_std"] / s["emb_std_ref"]
        why = []
        if std_ratio < self.std_floor:
            why.append(f"std {std_ratio:.3g} x 1/sqrt(d) < {self.std_floor:g}")
        if s["emb_std"] < self.drop * self.peak["emb_std"]:
            why.append(f"std {s['emb_std'] / self.peak['emb_std']:.2f} of its peak < {self.drop:g}")
        if s["emb_rank"] < self.drop * self.peak["emb_rank"]:
            why.append(f"effective rank {s['emb_rank']:.1f} of {s['emb_rank_max']:.0f}, "
                       f"< {self.drop:g} x its peak {self.peak['emb_rank']:.1f}")
        if not why:
            self.low_streak, self.warned = 0, False
            return None
        self.low_streak += 1
        if self.low_streak < self.patience or self.warned:
            return None
        self.warned = True
        return (f"WARNING: the embeddings are collapsing at step {step} ({'; '.join(why)}; {self.low_streak} "
                f"checks in a row). {self.hint}")

    def state_dict(self) -> dict:
        """Peaks and episode state (not the buffer), so a resumed run judges against the same peaks."""
        return {"peak": dict(self.peak), "low_streak": self.low_streak, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.peak = dict(state.get("peak", {}))
        self.low_streak, self.warned = int(state.get("low_streak", 0)), bool(state.get("warned", False))
