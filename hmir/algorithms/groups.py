"""Rectangular group alignment: grouped spaces whose group counts or group sizes differ.

A has ``GA`` groups of ``kA`` units, B ``GB`` groups of ``kB``; the merged model keeps A's
architecture, hence ``GA`` groups of ``r / GA`` units (``r``: the merged width, a multiple
of ``GA``). Each pair (A group g, B group h) is scored by the mean correlation of the best
one-to-one matching of their units (rectangular Hungarian), summed over the spaces of one
group class. Every B group is then assigned to one A group, each A group taking at most
``ceil(GB / GA)`` of them (Hungarian on the score repeated per slot): with ``GB <= GA``
this is a one-to-one pairing and the unpaired A groups are kept as they are. Within each
merged group, A's units and the units of its B groups are zipped (elastic zip) to
``r / GA`` units; merged groups are laid out in A's group order, so one group of the
merged model only ever holds units of one A group and its B groups.

Grouped convolutions need ``GA == GB`` (their merged weight is block diagonal in both
models' groups); GroupNorm alone allows any counts.

Example::

    >>> import torch
    >>> score = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.7, 0.1, 0.9, 0.1]])
    >>> assign_groups(score)                 # 2 A groups, 4 B groups
    [[1, 3], [0, 2]]
"""
from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

from hmir.errors import MergeError
from hmir.ir import Space
from hmir.algorithms.matching import Match, _build, match_zip

__all__ = ["group_scores", "assign_groups", "match_groups_rect", "match_groups_keep", "within_match",
           "match_group_class"]


def _example():
    """The docstrings' example: A has 4 groups of 2 units, B 2 groups that are A's groups 2
    and 0; returns their joint correlation and the two spaces."""
    from hmir.algorithms.matching import correlation

    x = torch.randn(100, 8, dtype=torch.float64)
    feats = torch.cat([x, x[:, [4, 5, 0, 1]]], 1)
    return (correlation(feats.mean(0), feats.T.cov()), Space(0, "gn", 8, group_size=2),
            Space(0, "gn", 4, group_size=2))


def _best_mean(block: torch.Tensor) -> float:
    """Mean of the best one-to-one matching of a (kA, kB) block (rectangular Hungarian)."""
    c = block.detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean())


def group_scores(corrs: list[torch.Tensor], spaces_a: list[Space],
                 spaces_b: list[Space]) -> torch.Tensor:
    """(GA, GB) group-pair scores summed over the spaces of one group class.

    Example::

        >>> corr, sa, sb = _example()          # B's 2 groups are A's groups 2 and 0
        >>> s = group_scores([corr], [sa], [sb])
        >>> s.shape, s.argmax(0).tolist(), round(float(s[2, 0]), 6)
        (torch.Size([4, 2]), [2, 0], 1.0)
    """
    ga, gb = spaces_a[0].groups, spaces_b[0].groups
    total = torch.zeros(ga, gb, dtype=torch.float64)
    for corr, sa, sb in zip(corrs, spaces_a, spaces_b):
        ka, kb = sa.group_size, sb.group_size
        cross = corr[:sa.n, sa.n:].cpu()
        for g in range(ga):
            for h in range(gb):
                total[g, h] += _best_mean(cross[g * ka:(g + 1) * ka, h * kb:(h + 1) * kb])
    return total


def assign_groups(score: torch.Tensor) -> list[list[int]]:
    """Per A group, the B groups merged into it (each B group exactly once, balanced)."""
    ga, gb = score.shape
    slots = max(1, math.ceil(gb / ga))
    rows, cols = linear_sum_assignment(score.repeat_interleave(slots, 0).double().numpy(),
                                       maximize=True)
    out: list[list[int]] = [[] for _ in range(ga)]
    for r, h in sorted(zip(rows.tolist(), cols.tolist())):
        out[r // slots].append(int(h))
    return [sorted(hs) for hs in out]


def _match_space(corr: torch.Tensor, sa: Space, sb: Space, assign: list[list[int]], r: int,
                 alpha: float, beta: float) -> Match:
    """Zip each A group with its B groups to ``r / GA`` units; groups in A's group order."""
    if r % sa.groups:
        raise MergeError(f"grouped space '{sa.name}': merged width {r} is not a whole number of "
                         f"its {sa.groups} groups; ask for a width that is a multiple of {sa.groups}")
    kr, groups = r // sa.groups, []
    for g, hs in enumerate(assign):
        ia = list(range(g * sa.group_size, (g + 1) * sa.group_size))
        ib = [sa.n + h * sb.group_size + j for h in hs for j in range(sb.group_size)]
        idx = torch.tensor(ia + ib)
        if kr > len(idx):
            raise MergeError(f"grouped space '{sa.name}': merged group {g} needs {kr} units but "
                             f"A's group and its {len(hs)} B group(s) have only {len(idx)}; ask "
                             f"for a smaller width (e.g. width='min')")
        sub = corr[idx][:, idx]
        m = match_zip(sub, len(ia), len(ib), kr, alpha=alpha, beta=beta)
        groups += [tuple(int(idx[u]) for u in grp) for grp in m.groups]
    return _build(groups, sa.n + sb.n, corr, corr.device, corr.dtype)


def match_groups_rect(corrs: list[torch.Tensor], spaces_a: list[Space], spaces_b: list[Space],
                      widths: list[int], *, alpha: float = 0.5,
                      beta: float = 0.5) -> tuple[list[Match], list[list[int]]]:
    """Matches of the spaces of one group class, and the group assignment they share.

    Example::

        >>> corr, sa, sb = _example()          # B's 2 groups are A's groups 2 and 0
        >>> ms, assign = match_groups_rect([corr], [sa], [sb], [8])   # merged width 8: A's
        >>> assign                                # per A group, its B groups
        [[1], [], [0], []]
        >>> ms[0].groups                          # B's units are 8..11
        [(0, 10), (1, 11), (2,), (3,), (4, 8), (5, 9), (6,), (7,)]
    """
    grouped_conv = [s.name for s in spaces_a + spaces_b if any(sl.grouped for sl in s.slices)]
    ga, gb = spaces_a[0].groups, spaces_b[0].groups
    if ga != gb and grouped_conv:
        raise MergeError(f"grouped space '{grouped_conv[0]}' is read by a grouped convolution "
                         f"with {ga} groups in one model and {gb} in the other: a merged grouped "
                         f"convolution must keep both models' groups whole; merge models whose "
                         f"grouped convolutions have equal group counts")
    assign = assign_groups(group_scores(corrs, spaces_a, spaces_b))
    matches = [_match_space(c, sa, sb, assign, r, alpha, beta)
               for c, sa, sb, r in zip(corrs, spaces_a, spaces_b, widths)]
    return matches, assign


def _hungarian(score: torch.Tensor) -> torch.Tensor:
    """``perm[i]``: the column matched to row ``i`` (square Hungarian, maximising)."""
    rows, cols = linear_sum_assignment(score.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def within_match(block: torch.Tensor, parts) -> torch.Tensor:
    """Best one-to-one matching of one group's units to another's (a (k, k) correlation block),
    part by part (:mod:`hmir.ir.parts`); pinned units stay in place. ``perm[j]``: the unit
    matched to unit ``j``.

    Example::

        >>> within_match(torch.eye(4)[[1, 0, 3, 2]], ((0, 2, True), (2, 4, False))).tolist()
        [0, 1, 3, 2]
    """
    k = block.shape[0]
    perm = torch.arange(k)
    for lo, hi, pinned in (parts or ((0, k, False),)):
        if not pinned:
            perm[lo:hi] = lo + _hungarian(block[lo:hi, lo:hi])
    return perm


def _pair_scores(blocks: torch.Tensor, parts) -> tuple[torch.Tensor, dict]:
    """For (G, H, k, k) blocks of unit correlations: the (G, H) mean correlation of each group
    pair's best within-group matching, and those matchings ({(g, h): perm})."""
    scores = torch.zeros(blocks.shape[:2], dtype=torch.float64)
    perms = {}
    for g in range(blocks.shape[0]):
        for h in range(blocks.shape[1]):
            perm = perms[g, h] = within_match(blocks[g, h], parts)
            scores[g, h] = blocks[g, h][torch.arange(len(perm)), perm].mean()
    return scores, perms


def match_groups_keep(corrs: list[torch.Tensor], spaces_a: list[Space], spaces_b: list[Space],
                      widths: list[int], *, alpha: float = 0.5, beta: float = 0.5) -> list[Match]:
    """Rectangular alignment that keeps the group size (pinned units: a rotary head's size is
    fixed) and zips whole groups: the ``GA + GB`` groups are zipped (ZipIt's greedy zip on the
    group similarity, the best within-group matching's mean correlation) into ``r / k`` merged
    groups; inside a merged group, units are matched to its first group's, part by part.

    Example::

        >>> from hmir.algorithms.matching import correlation
        >>> x = torch.randn(200, 4, dtype=torch.float64)
        >>> feats = torch.cat([x, x[:, [2, 3]]], 1)            # B's one group is A's group 1
        >>> corr = correlation(feats.mean(0), feats.T.cov())
        >>> sa = Space(0, "q", 4, group_size=2, parts=((0, 2, True),))
        >>> sb = Space(0, "q", 2, group_size=2, parts=((0, 2, True),))
        >>> match_groups_keep([corr], [sa], [sb], [4])[0].groups
        [(0,), (1,), (2, 4), (3, 5)]
    """
    k = [sa.group_size for sa in spaces_a]
    bad = [sa.name for sa, sb, r in zip(spaces_a, spaces_b, widths)
           if sa.group_size != sb.group_size or r % sa.group_size]
    counts = {r // sa.group_size for sa, r in zip(spaces_a, widths)}
    if bad or len(counts) != 1:
        raise MergeError(f"grouped space '{(bad or [spaces_a[0].name])[0]}' has heads with pinned "
                         f"(rotary) units: a merge keeps their size, so both models need the same "
                         f"head size and every space of the group class a merged width of the same "
                         f"number of heads (widths {widths}, head sizes {k})")
    ga, gb, gr = spaces_a[0].groups, spaces_b[0].groups, counts.pop()
    n = ga + gb
    scored = [_pair_scores(c.cpu().reshape(n, kk, n, kk).permute(0, 2, 1, 3), sa.parts)
              for c, kk, sa in zip(corrs, k, spaces_a)]
    sim = sum(scores for scores, _ in scored) / len(scored)
    zipped = match_zip(sim, ga, gb, gr, alpha=alpha, beta=beta).groups
    out = []
    for corr, (_, perms), sa, sb, kk in zip(corrs, scored, spaces_a, spaces_b, k):
        units = [tuple(h * kk + int(perms[grp[0], h][j]) for h in grp)
                 for grp in zipped for j in range(kk)]
        out.append(_build(units, sa.n + sb.n, corr, corr.device, corr.dtype))
    return out


def match_group_class(corrs: list[torch.Tensor], spaces: list[Space]) -> list[Match]:
    """Group alignment for spaces sharing one group permutation (design.md, MuDSC).

    Bases (spaces that are no view) score every group pair by the best within-group matching
    their parts allow (pinned units stay in place); the group permutation maximises the sum.
    A view then follows its base, and the order of its copies inside each group (grouped-query
    heads) is matched by Hungarian on the views' correlations. ``corrs``: per space, the
    (nA + nB)² correlation of A's and B's units.

    Example::

        >>> from hmir.algorithms.matching import correlation
        >>> x = torch.randn(300, 4, dtype=torch.float64)
        >>> feats = torch.cat([x, x[:, [2, 3, 0, 1]]], 1)        # B: A's two heads swapped
        >>> corr = correlation(feats.mean(0), feats.T.cov()).float()
        >>> s = Space(0, "qk", 4, group_size=2, parts=((0, 2, True),))
        >>> match_group_class([corr], [s])[0].groups
        [(0, 6), (1, 7), (2, 4), (3, 5)]
    """
    index = {s.id: i for i, s in enumerate(spaces)}
    bases = [i for i, s in enumerate(spaces) if s.view is None]
    G = spaces[bases[0]].class_groups
    total = torch.zeros(G, G, dtype=torch.float64)
    within: dict[int, dict] = {}
    for i in bases:
        s, k = spaces[i], spaces[i].group_size
        scores, within[i] = _pair_scores(
            corrs[i][:s.n, s.n:].reshape(G, k, G, k).permute(0, 2, 1, 3), s.parts)
        total += scores
    sigma = _hungarian(total)
    rho = {i: torch.stack([within[i][g, int(sigma[g])] for g in range(G)]) for i in bases}
    tau = _copy_orders(corrs, spaces, index, sigma, rho)
    out = []
    for corr, s in zip(corrs, spaces):
        k, v = s.group_size, s.view
        rep = v.rep if v else 1
        units = rho[index[v.base]][:, v.lo:v.lo + k] - v.lo if v else rho[index[s.id]]
        order = tau.get(rep, torch.arange(rep).repeat(G, 1))
        old = (sigma.view(-1, 1) * rep + order).unsqueeze(-1) * k + units.unsqueeze(1)
        groups = [(i, s.n + int(j)) for i, j in enumerate(old.flatten())]
        out.append(_build(groups, 2 * s.n, corr, corr.device, torch.float32))
    return out


def _copy_orders(corrs, spaces, index, sigma, rho) -> dict:
    """Per copy count ``rep``: for each group, the order of B's copies matched to A's (Hungarian).
    All ``spaces`` are of one group class, so views with one ``rep`` share the order."""
    G, out = len(sigma), {}
    views = [i for i, s in enumerate(spaces) if s.view is not None and s.view.rep > 1]
    for rep in sorted({spaces[i].view.rep for i in views}):
        score = torch.zeros(G, rep, rep, dtype=torch.float64)
        for i in (i for i in views if spaces[i].view.rep == rep):
            s, v = spaces[i], spaces[i].view
            k = s.group_size
            cross = corrs[i][:s.n, s.n:].reshape(G, rep, k, G, rep, k)
            units = rho[index[v.base]][:, v.lo:v.lo + k] - v.lo
            for g in range(G):
                blk = cross[g, :, :, int(sigma[g])][:, :, :, units[g]]       # (rep, k, rep, k)
                score[g] += blk.diagonal(dim1=1, dim2=3).mean(-1)
        out[rep] = torch.stack([_hungarian(score[g]) for g in range(G)])
    return out
