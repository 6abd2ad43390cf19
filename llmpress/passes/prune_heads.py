"""Attention-head pruning for ``prune(heads=p)``: whole KV groups, found from the graph and sliced out.

Why whole KV groups (and not query heads spread evenly over the groups): a KV group is a KV head and the ``rep =
n_heads / n_kv_heads`` query heads that read it. Removing a group shrinks q/k/v/o *and* the KV cache (the decode
step reads the cache, so its bytes are decode time too), keeps ``rep`` unchanged (every backend's grouped
attention stays the same kernel), and needs no change to the attention op. Removing query heads evenly per group
would keep the cache and the k/v projections whole and change ``rep``.

Match, per ``scaled_dot_product_attention(q, k_cache', v_cache')`` node: ``k_cache'``/``v_cache'`` are
``scatter(cache, 2, index, src)`` writes into cache inputs of the calling convention (read by nothing else), their
``index`` an ``expand(.., [b, n_kv, t, d])``; following first arguments back from ``q`` and the two ``src`` reaches
a ``view(.., [b, t, heads, d])`` of a plain linear (q/k/v projections; RoPE's ``x * cos + rotate(x) * sin`` keeps
``x`` first); the output goes ``transpose -> reshape(.., [b, t, heads * d]) -> linear`` (o projection). Anything else
(qk-norm weights in front of the view, quantized or fused projections, a quantized cache) is a near miss with the
reason.

Rewrite with the kept groups ``G`` (sorted): q rows and o columns ``[g rep d, (g + 1) rep d)``, k/v rows
``[g d, (g + 1) d)`` for ``g`` in ``G`` (and the q/k/v biases' rows); the head counts in the three views, the
``expand`` and the ``reshape`` become ``|G| rep`` / ``|G|``; the two cache inputs become ``[b, |G|, len, d]``, and
``LMInfo`` follows (``n_kv_heads`` when every attention keeps the same count, else explicit ``caches``). The kept
heads compute exactly what they did: attention is per head, and o's columns of the removed heads are gone.

Scores of group ``g`` (``C_g`` its columns of o's input ``h``): ``wanda`` ``sum_{j in C_g} ||h_j|| ||W_o[:, j]||``;
``magnitude`` ``||W_q[C_g]|| ||W_v[rows of g]|| ||W_o[:, C_g]||``; ``random`` seeded.

Measured on tinystories-llama (8 layers, 8 query / 4 KV heads; test_prune.py's protocol: 16K-token valid prefix,
fp32 24.881): ``heads=0.25`` (one group of four per layer) 1.468x with wanda, 1.619x magnitude, 1.714x random.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..ir.meta import source_path
from ..ir.module import Module

__all__ = ["AttentionGroup", "find_attentions", "group_scores", "prune_attention", "update_lm"]

_A = torch.ops.aten
_LINEAR = _A.linear.default
_SDPA = _A.scaled_dot_product_attention.default
_SCATTER = _A.scatter.src
_VIEWS = (_A.view.default, _A.reshape.default, _A._unsafe_view.default)


@dataclass
class AttentionGroup:
    """One attention found in the graph (see the module docstring for the pattern)."""

    path: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    o: fx.Node
    views: tuple[fx.Node, fx.Node, fx.Node]  # q, k, v views carrying the head count at index 2
    expands: tuple[fx.Node, ...]  # cache-write indices carrying n_kv at index 1
    caches: tuple[fx.Node, fx.Node]  # the k and v cache inputs
    reshape: fx.Node  # [b, t, heads * d] before o
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def linears(self) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
        return self.q, self.k, self.v, self.o


def _call(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _view_of_linear(node) -> fx.Node | None:
    for _ in range(16):  # RoPE, transposes: a short chain of first arguments
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return None
        if node.target in _VIEWS and _call(node.args[0], (_LINEAR,)):
            return node
        node = node.args[0]
    return None


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _match(module: Module, s: fx.Node, inputs: set) -> AttentionGroup | str:
    q_in, kc, vc = s.args[:3]
    for w in (kc, vc):
        if not (_call(w, (_SCATTER,)) and w.args[0] in inputs and w.args[1] == 2 and len(w.args[0].users) == 1):
            return "keys/values are not a scatter write into a cache input of the calling convention"
    views = [_view_of_linear(x) for x in (q_in, kc.args[3], vc.args[3])]
    if any(v is None for v in views):
        return "q/k/v do not come from a view of a plain linear (qk-norm, quantized or fused projections)"
    t = _only_user(s)
    r = _only_user(t) if t is not None else None
    o = _only_user(r) if r is not None else None
    if not (_call(t, (_A.transpose.int,)) and _call(r, _VIEWS) and _call(o, (_LINEAR,)) and o.args[0] is r):
        return "the attention output does not go transpose -> reshape -> one linear"
    expands = tuple(dict.fromkeys(w.args[2] for w in (kc, vc)))
    if not all(_call(e, (_A.expand.default,)) for e in expands):
        return "the cache write index is not an expand"
    qs, ks, vs = (tuple(v.meta["val"].shape) for v in views)
    h, kv, d = int(qs[2]), int(ks[2]), int(ks[3])
    if int(vs[2]) != kv or int(qs[3]) != d or h % kv or any(len(v.args[1]) != 4 for v in views) \
            or any(int(e.args[1][1]) != kv for e in expands) or int(r.args[1][-1]) != h * d:
        return f"head counts do not line up (q {qs}, k {ks}, v {vs})"
    lin = [v.args[0] for v in views] + [o]
    for n in lin:
        w = module.weight(n.args[1])
        if w is None or w.dim() != 2 or not w.is_floating_point():
            return f"{source_path(n) or n.name}'s weight is not a stored 2-D float tensor"
        if len(n.args[1].users) > 1:
            return f"{source_path(n) or n.name}'s weight is also read elsewhere (tied)"
    return AttentionGroup(source_path(s) or s.name, *lin, views=tuple(views), expands=expands,
                          caches=(kc.args[0], vc.args[0]), reshape=r, n_heads=h, n_kv=kv, head_dim=d)


def find_attentions(module: Module) -> tuple[list[AttentionGroup], list[tuple[str, str]]]:
    """Every attention whose KV groups can be pruned, and (path, reason) for each near miss."""
    inputs = set(module.user_inputs())
    found, skipped = [], []
    for s in module.graph.nodes:
        if _call(s, (_SDPA,)):
            m = _match(module, s, inputs)
            if isinstance(m, str):
                skipped.append((source_path(s) or s.name, m))
            else:
                found.append(m)
    return found, skipped


def _rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices ``[g width, (g + 1) width)`` of each ``g``, in order."""
    return (groups.unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def group_scores(module: Module, a: AttentionGroup, *, score: str, sumsq: torch.Tensor | None, seed: int
                 ) -> torch.Tensor:
    """Importance ``[n_kv]`` of each KV group (see the module docstring)."""
    rep, d = a.n_heads // a.n_kv, a.head_dim
    wq, wv, wo = (module.weight(n.args[1]).detach().float() for n in (a.q, a.v, a.o))
    cols = [_rows(torch.tensor([g]), rep * d) for g in range(a.n_kv)]
    if score == "wanda":
        per = sumsq.double().clamp_min(0).sqrt().float() * wo.norm(dim=0)
        return torch.stack([per[c].sum() for c in cols])
    if score == "magnitude":
        return torch.stack([wq[c].norm() * wv[g * d:(g + 1) * d].norm() * wo[:, c].norm()
                            for g, c in enumerate(cols)])
    return torch.rand(a.n_kv, generator=torch.Generator().manual_seed(seed))


def prune_attention(module: Module, a: AttentionGroup, keep: torch.Tensor, replace_weight) -> list[fx.Node]:
    """Keep the KV groups ``keep`` (sorted) of ``a``; returns the nodes whose shapes changed (in graph order)."""
    rep, d, g = a.n_heads // a.n_kv, a.head_dim, len(keep)
    q_rows, kv_rows = _rows(keep, rep * d), _rows(keep, d)
    for lin, rows in ((a.q, q_rows), (a.k, kv_rows), (a.v, kv_rows)):
        b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if isinstance(b, fx.Node):
            replace_weight(module, b, module.weight(b)[rows].contiguous())
        replace_weight(module, lin.args[1], module.weight(lin.args[1])[rows].contiguous())
    replace_weight(module, a.o.args[1], module.weight(a.o.args[1])[:, q_rows].contiguous())
    for view, count in zip(a.views, (g * rep, g, g)):
        view.args = (view.args[0], [*view.args[1][:2], count, view.args[1][3]])
    for e in a.expands:
        e.args = (e.args[0], [e.args[1][0], g, *e.args[1][2:]])
    a.reshape.args = (a.reshape.args[0], [*a.reshape.args[1][:-1], g * rep * d])
    fm = module.fake_mode()
    for c in a.caches:
        shape = list(c.meta["val"].shape)
        shape[1] = g
        example = torch.zeros(shape, dtype=c.meta["val"].dtype)
        c.meta["val"] = fm.from_tensor(example, static_shapes=True) if fm is not None else example.to("meta")
    # every node downstream of what changed, up to the o projection (whose output shape is unchanged)
    todo = {a.q, a.k, a.v, *a.expands, *a.caches}
    frontier = list(todo)
    while frontier:
        n = frontier.pop()
        if n is a.o:
            continue
        for u in n.users:
            if u.op == "call_function" and u not in todo:
                todo.add(u)
                frontier.append(u)
    changed = [n for n in module.graph.nodes if n in todo and n.op == "call_function"]
    for n in changed:
        module.infer_meta(n)
        if "tensor_meta" in n.meta:
            n.meta["tensor_meta"] = _extract_tensor_metadata(n.meta["val"])
    for c in a.caches:
        if "tensor_meta" in c.meta:
            c.meta["tensor_meta"] = _extract_tensor_metadata(c.meta["val"])
    return changed


def update_lm(module: Module, pruned: list[AttentionGroup], kept: int) -> None:
    """``LMInfo`` after pruning ``pruned`` to ``kept`` KV groups each: ``n_kv_heads = kept`` when every cache now
    has the default layout with it, else explicit ``caches``. Called after every block, so calibration runs of
    later blocks (which allocate their caches from ``LMInfo``) already see the smaller caches."""
    lm = module.lm
    if lm is None or not pruned:
        return
    users = module.user_inputs()
    specs = [{**c, "shape": list(c["shape"])} for c in lm.cache_specs()]
    for a in pruned:
        for c in a.caches:
            specs[users.index(c) - 2]["shape"][0] = kept  # users: input_ids, start_pos, caches...
    uniform = dataclasses.replace(lm, n_kv_heads=kept, caches=())
    module.lm = uniform if uniform.cache_specs() == specs else dataclasses.replace(lm, caches=tuple(specs))
