"""Factorized spectral weights: CP and Tucker forms of the complex filter ``W``, applied without forming ``W``.

A spectral convolution (:class:`models.sfno_layers.SpectralConv`) filters coefficients with a complex
tensor of shape ``(co, ci, L)`` ("driscoll-healy") or ``(co, ci, L, M)`` ("diagonal"). As in
tensorly-torch's factorized tensors (the neural-operator line of work), it can be held as::

    CP      W[o,i,l,m] = Σ_r A[o,r] B[i,r] C[l,r] D[m,r]
    Tucker  W[o,i,l,m] = Σ_{a,b,c,d} G[a,b,c,d] U_o[o,a] U_i[i,b] U_l[l,c] U_m[m,d]

(without ``D``, ``U_m`` and ``m`` for "driscoll-healy"). Every factor is complex, stored as real pairs
``(…, 2)`` like the dense weight. Filtering coefficients ``x[m, l, b, i]`` then never needs ``W``::

    CP      y = A · ((C[l]·D[m]) ⊙ (Bᵀ·x))                  ci → r, scale, r → co
    Tucker  y = U_o · H[l,m] · (U_iᵀ·x),   H[l,m] = Σ_{c,d} G[·,·,c,d] U_l[l,c] U_m[m,d]

so memory and arithmetic grow with the rank; ``H`` is ``ro × ri`` per ``(l, m)``, in the rank space.
Every complex product is done in real arithmetic (``[xr xi] · [[Wr Wi], [−Wi Wr]]``), like the dense path,
so autocast, DDP and compilation see only real tensors.

**Rank.** A float in (0, 1] is the fraction of the dense tensor's parameters the factors may hold
(tensorly-torch's ``rank=0.1`` convention; CP then gets the largest ``r`` that fits, Tucker ranks
proportional to the mode sizes). An int is the CP rank ``r``, or the Tucker rank of every mode. A rank
whose factors would hold more numbers than the dense tensor, or a Tucker rank above a mode's size, is
larger than the full tensor and refused (:func:`resolve_rank`).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from core.errors import ConfigError

FACTORIZED = ("cp", "tucker")


def dense_size(shape: tuple[int, ...]) -> int:
    """Complex entries of the dense tensor of ``shape``."""
    return math.prod(shape)


def factorized_size(kind: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Complex entries of a CP (``ranks = (r,)``) or Tucker (one rank per mode) factorization of ``shape``."""
    if kind == "cp":
        return ranks[0] * sum(shape)
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks, strict=True))


def _largest_int_rank(kind: str, shape: tuple[int, ...]) -> int:
    """The largest integer rank whose factors are no larger than the dense tensor (Tucker: nor any mode)."""
    if kind == "cp":
        return dense_size(shape) // sum(shape)
    fits = [r for r in range(1, min(shape) + 1)
            if factorized_size(kind, shape, (r,) * len(shape)) <= dense_size(shape)]
    return max(fits, default=0)


def _fraction_ranks(kind: str, shape: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    """The largest ranks whose factors hold at most ``fraction`` of the dense entries (at least rank 1)."""
    budget = fraction * dense_size(shape)
    if kind == "cp":
        return (max(1, int(budget // sum(shape))),)

    def ranks(c: float) -> tuple[int, ...]:
        return tuple(max(1, min(n, math.floor(c * n))) for n in shape)

    # Tucker ranks ∝ the mode sizes (tensorly-torch's choice); the size grows with c, so bisect for the largest.
    lo, hi = 0.0, 1.0
    if factorized_size(kind, shape, ranks(hi)) <= budget:
        return ranks(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if factorized_size(kind, shape, ranks(mid)) <= budget else (lo, mid)
    return ranks(lo)


def resolve_rank(kind: str, shape: tuple[int, ...], rank: float) -> tuple[int, ...]:
    """The CP rank ``(r,)`` or per-mode Tucker ranks that ``rank`` means for ``shape``; ValueError if too large."""
    if kind not in FACTORIZED:
        raise ConfigError(f"factorization={kind!r} (expected one of {', '.join(map(repr, FACTORIZED))})")
    largest = _largest_int_rank(kind, shape)
    allowed = (f"a fraction in (0, 1] of its {dense_size(shape)} complex entries, or an integer rank "
               f"from 1 to {largest}")
    if isinstance(rank, bool) or not isinstance(rank, int | float):
        raise ConfigError(f"rank={rank!r} for a {kind} weight of shape {shape}: expected {allowed}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ConfigError(f"rank={rank!r} for a {kind} weight of shape {shape} is larger than the full tensor "
                              f"or not positive: expected {allowed}")
        return _fraction_ranks(kind, shape, rank)
    if not 1 <= rank <= largest:
        what = "holds more numbers than the dense tensor" + (" or exceeds a mode's size" if kind == "tucker" else "")
        raise ConfigError(f"rank={rank} for a {kind} weight of shape {shape} is larger than the full tensor (its "
                          f"factors {what}): expected {allowed}")
    return (rank,) if kind == "cp" else (rank,) * len(shape)


def cblock(w: torch.Tensor) -> torch.Tensor:
    """Real form ``[[Re, Im], [−Im, Re]]`` ``(…, 2n, 2k)`` of complex ``w`` ``(…, n, k, 2)``: ``[xr xi]·it = x·w``."""
    wr, wi = w[..., 0], w[..., 1]
    return torch.cat([torch.cat([wr, wi], dim=-1), torch.cat([-wi, wr], dim=-1)], dim=-2)


def cmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise complex product of real pairs ``(…, 2)`` (broadcasting)."""
    ar, ai = a.unbind(-1)
    br, bi = b.unbind(-1)
    return torch.stack([ar * br - ai * bi, ar * bi + ai * br], dim=-1)


def ceinsum(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``einsum(equation, a, b)`` of complex tensors held as real pairs ``(…, 2)`` (the pair axis not in ``equation``)."""
    ar, ai = a.unbind(-1)
    br, bi = b.unbind(-1)
    re = torch.einsum(equation, ar, br) - torch.einsum(equation, ai, bi)
    im = torch.einsum(equation, ar, bi) + torch.einsum(equation, ai, br)
    return torch.stack([re, im], dim=-1)


def _complex_normal(*shape: int, var: float) -> nn.Parameter:
    """A complex Gaussian parameter ``(*shape, 2)`` with ``E|z|² = var``."""
    return nn.Parameter(math.sqrt(var / 2.0) * torch.randn(*shape, 2))


class FactorizedWeight(nn.Module, abc.ABC):
    """A factorized complex filter ``W[o, i, l(, m)]``: applies itself to coefficients and reconstructs for tests."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.diagonal = len(shape) == 4

    def contract(self, coeffs: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients ``(2, m, l, batch, ci)`` → ``Σ_i W[o,i,l(,m)] x[i]`` ``(2, m, l, batch, co)``, plus ``local·x``.

        ``local`` ``(co, ci)`` is a real 1×1 map applied at every (l, m): it cannot join the factors, so it
        is one more GEMM added to the output (the dense path folds it into ``W`` instead).
        """
        _, m, lmax, b, ci = coeffs.shape
        x = coeffs.permute(2, 1, 3, 0, 4).reshape(lmax * m * b, 2 * ci)  # rows (l, m, batch), columns (part, ci)
        y = self.filter(x, lmax, m)  # (l·m·b, 2co)
        co = y.shape[-1] // 2
        if local is not None:
            y = torch.addmm(y.view(-1, co), x.view(-1, ci), local.t().to(x.dtype)).view(y.shape)
        return y.view(lmax, m, b, 2, co).permute(3, 1, 0, 2, 4).contiguous()

    @abc.abstractmethod
    def filter(self, x: torch.Tensor, lmax: int, m: int) -> torch.Tensor:
        """Rows ``(l·m·batch, 2ci)`` of ``[re im]`` coefficients → ``(l·m·batch, 2co)`` filtered by ``W``."""

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The dense tensor ``(co, ci, L(, M), 2)`` these factors stand for (tests and inspection only)."""


class CPWeight(FactorizedWeight):
    """``W = Σ_r A[:,r] ∘ B[:,r] ∘ C[:,r] (∘ D[:,r])``: factors ``out_factor`` A, ``in_factor`` B, degree C, order D."""

    def __init__(self, shape: tuple[int, ...], rank: int, scale: float) -> None:
        super().__init__(shape)
        # E|W|² = r·σ^(2k) for k factors of variance σ²: match the dense weight's 2·scale² (re and im parts).
        var = (2.0 * scale**2 / rank) ** (1.0 / len(shape))
        co, ci, nl = shape[:3]
        self.out_factor = _complex_normal(co, rank, var=var)
        self.in_factor = _complex_normal(ci, rank, var=var)
        self.degree_factor = _complex_normal(nl, rank, var=var)
        self.order_factor = _complex_normal(shape[3], rank, var=var) if self.diagonal else None

    def filter(self, x: torch.Tensor, lmax: int, m: int) -> torch.Tensor:
        """``A·((C[l]·D[m]) ⊙ (Bᵀ·x))``: project on the rank-r factor, scale per (l, m), expand to co."""
        dt = x.dtype
        p = (x @ cblock(self.in_factor.to(dt))).view(lmax, m, -1, 2, self.in_factor.shape[1])
        s = self.degree_factor[:lmax, None].to(dt)  # (l, 1, r, 2): one scale for every order
        if self.order_factor is not None:
            s = cmul(s, self.order_factor[None, :m].to(dt))
        sr, si = s[:, :, None, :, 0], s[:, :, None, :, 1]  # (l, m|1, 1, r): broadcast over the batch
        pr, pi = p[..., 0, :], p[..., 1, :]
        q = torch.stack([pr * sr - pi * si, pr * si + pi * sr], dim=-2)
        return q.view(x.shape[0], -1) @ cblock(self.out_factor.transpose(0, 1).to(dt))

    def dense(self) -> torch.Tensor:
        """``Σ_r A ∘ B ∘ C (∘ D)`` as a dense ``(co, ci, L(, M), 2)`` tensor."""
        ab = ceinsum("or,ir->oir", self.out_factor, self.in_factor)
        if self.order_factor is None:
            return ceinsum("oir,lr->oil", ab, self.degree_factor)
        return ceinsum("oilr,mr->oilm", ceinsum("oir,lr->oilr", ab, self.degree_factor), self.order_factor)


class TuckerWeight(FactorizedWeight):
    """``W = G ×_o U_o ×_i U_i ×_l U_l (×_m U_m)``: a small complex ``core`` and one factor matrix per mode."""

    def __init__(self, shape: tuple[int, ...], ranks: tuple[int, ...], scale: float) -> None:
        super().__init__(shape)
        # Factor entries of variance 1/r_k make each mode product variance-preserving, so E|W|² = E|G|² = 2·scale².
        self.core = _complex_normal(*ranks, var=2.0 * scale**2)
        self.out_factor = _complex_normal(shape[0], ranks[0], var=1.0 / ranks[0])
        self.in_factor = _complex_normal(shape[1], ranks[1], var=1.0 / ranks[1])
        self.degree_factor = _complex_normal(shape[2], ranks[2], var=1.0 / ranks[2])
        self.order_factor = _complex_normal(shape[3], ranks[3], var=1.0 / ranks[3]) if self.diagonal else None

    def filter(self, x: torch.Tensor, lmax: int, m: int) -> torch.Tensor:
        """``U_o·H[l,m]·(U_iᵀ·x)`` with ``H`` the core contracted with the degree (and order) factors."""
        dt = x.dtype
        ri = self.in_factor.shape[1]
        p = x @ cblock(self.in_factor.to(dt))  # (l·m·b, 2ri)
        core, deg = self.core.to(dt), self.degree_factor[:lmax].to(dt)
        if self.order_factor is None:
            h = cblock(ceinsum("abc,lc->lba", core, deg))  # (l, 2ri, 2ro): shared by every order
            q = torch.bmm(p.view(lmax, -1, 2 * ri), h)
        else:
            h = ceinsum("labd,md->lmba", ceinsum("abcd,lc->labd", core, deg), self.order_factor[:m].to(dt))
            q = torch.bmm(p.view(lmax * m, -1, 2 * ri), cblock(h).flatten(0, 1))
        return q.reshape(x.shape[0], -1) @ cblock(self.out_factor.transpose(0, 1).to(dt))

    def dense(self) -> torch.Tensor:
        """The core multiplied by every factor matrix, as a dense ``(co, ci, L(, M), 2)`` tensor."""
        w = ceinsum("ab...,oa->ob...", self.core, self.out_factor)
        w = ceinsum("ob...,ib->oi...", w, self.in_factor)
        if self.order_factor is None:
            return ceinsum("oic,lc->oil", w, self.degree_factor)
        return ceinsum("oild,md->oilm", ceinsum("oicd,lc->oild", w, self.degree_factor), self.order_factor)


def factorized_weight(kind: str, shape: tuple[int, ...], rank: float, scale: float) -> FactorizedWeight:
    """The ``kind`` ("cp" | "tucker") factorization of a ``shape`` filter at ``rank``, initialised like a dense one."""
    ranks = resolve_rank(kind, shape, rank)
    return CPWeight(shape, ranks[0], scale) if kind == "cp" else TuckerWeight(shape, ranks, scale)
