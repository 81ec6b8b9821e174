"""A merged Hugging Face model as a Hugging Face model again: the source's class, a new config.

``MergeResult.module`` holds its parameters under model A's state-dict names, plus inserted
units (depth merges) as ``hmir_inserted.stage<s>_pos<j>.<template name, dots as underscores>``.
:func:`rebuild_pretrained` numbers each ``nn.ModuleList``'s layers in the order the graph runs
them, derives the config from A's and the merged shapes through the config's own keys (no model
family hard-coded), loads the weights strictly and checks parity with the merged program.
Where no config of A's class expresses the merge it raises :class:`RebuildError` (an example:
:func:`rebuild_pretrained`). torchvision models (no config) are not covered.
"""
from __future__ import annotations

import copy
import itertools
import re
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.errors import MergeError

# config keys by role, as the families spell them (the first one a config has is used)
ROLES = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "embedding": ("embedding_size",),
    "inter": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
}
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
GENERAL = "; result.module is the merged model in general (a GraphModule that runs, exports to ONNX)"
_INSERTED = re.compile(r"(hmir_inserted\.[^.]+)\.(.+)$")


class RebuildError(MergeError):
    """The merged model is not the source model's class with another config."""

    def __init__(self, why: str):
        super().__init__(f"cannot rebuild the merged model as its source class: {why}{GENERAL}")


def rebuild_pretrained(result, source: nn.Module | None = None, *, rtol: float = 1e-4) -> nn.Module:
    """``result``'s merged model as an instance of ``source``'s class (default: model A), in eval
    mode, whose outputs match ``result.module``'s on ``result.example`` (relative ``rtol``);
    ``generate()`` and ``save_pretrained()`` work on it. Raises :class:`RebuildError`.

    Example::

        >>> import transformers, hmir
        >>> cfg = lambda n, inter: transformers.BertConfig(hidden_size=32, num_hidden_layers=n,
        ...     num_attention_heads=2, intermediate_size=inter, vocab_size=100, num_labels=3)
        >>> a = transformers.BertForSequenceClassification(cfg(1, 64)).eval()
        >>> b = transformers.BertForSequenceClassification(cfg(2, 96)).eval()
        >>> batches = [torch.randint(0, 100, (8, 12)) for _ in range(2)]
        >>> merged = rebuild_pretrained(hmir.compile_merge(a, b, batches, progress=False))
        >>> c = merged.config                                 # B's depth, the wider FFN
        >>> type(merged).__name__, c.hidden_size, c.intermediate_size, c.num_hidden_layers
        ('BertForSequenceClassification', 32, 96, 2)
        >>> merged.training
        False
    """
    models = tuple(getattr(result.state, "models", None) or ())
    source = source if source is not None else (models[0] if models else None)
    if source is None or not hasattr(getattr(source, "config", None), "to_dict") \
            or not hasattr(source, "save_pretrained"):
        raise RebuildError(f"the source model ({type(source).__name__}) is not a Hugging Face "
                           f"PreTrainedModel")
    state = {k: v.detach() for k, v in result.module.state_dict().items()}
    state, lengths = _renumber(result.module, state, [source, *models[1:]])
    tried = list(_candidates(source, state, lengths))
    fits = [cfg for cfg, bad in tried if not bad]
    if not fits:
        raise RebuildError(_no_fit(source, state, tried))
    errors = []
    for cfg in fits[:4]:
        model = _load(type(source)(cfg), state)
        err = _parity(result.module, model, result.example)
        if err <= rtol:
            return model
        own = source.config.to_dict()
        new = {k: v for k, v in cfg.to_dict().items() if own.get(k) != v and not isinstance(v, list)}
        errors.append(f"{new or 'same config'}: {err:.2e}")
    raise RebuildError(f"every config whose shapes fit gives other outputs than the merged program "
                       f"(relative max difference > {rtol:g}: {'; '.join(errors)})")


# -- names: inserted units become layers of their ModuleList ---------------------------
def _renumber(gm: fx.GraphModule, state: dict, models) -> tuple[dict, dict[str, int]]:
    """``state`` with every ModuleList's layers numbered in graph order; each list's length."""
    lists = {n for n, mod in models[0].named_modules() if isinstance(mod, nn.ModuleList)}
    flat = {k.replace(".", "_"): k for m in reversed(models) for k in m.state_dict()}
    first = _first_use(gm)
    blocks: dict[str, dict] = {}               # list → block id → (first use, [(key, rest)])
    out = {}
    for key, t in state.items():
        m = _INSERTED.match(key)
        name = key if m is None else flat.get(m.group(2))
        parts = (name or "").split(".")
        cut = next((i for i in range(len(parts) - 1, 0, -1) if parts[i].isdigit()
                    and ".".join(parts[:i]) in lists), None)
        if cut is None:
            if m is not None:
                raise RebuildError(f"the inserted tensor '{key}' is not a layer of a ModuleList "
                                   f"of the source class")
            out[key] = t
            continue
        lst, bid = ".".join(parts[:cut]), (m.group(1) if m else int(parts[cut]))
        entry = blocks.setdefault(lst, {}).setdefault(bid, [float("inf"), []])
        entry[0] = min(entry[0], first.get(key, float("inf")))
        entry[1].append((".".join(parts[cut + 1:]), t))
    for lst, members in blocks.items():
        order = sorted(members, key=lambda b: (members[b][0], isinstance(b, str), str(b)))
        for i, bid in enumerate(order):
            out.update({f"{lst}.{i}.{rest}": t for rest, t in members[bid][1]})
    return out, {lst: len(members) for lst, members in blocks.items()}


def _first_use(gm: fx.GraphModule) -> dict[str, int]:
    """Tensor name → index of the first graph node that computes with it."""
    nodes = list(gm.graph.nodes)
    at = {n: i for i, n in enumerate(nodes)}
    first: dict[str, int] = {}
    for n in nodes:
        if n.op == "get_attr":
            first[n.target] = min((at[u] for u in n.users), default=at[n])
        elif n.op == "call_module":
            for k in gm.get_submodule(n.target).state_dict():
                first.setdefault(f"{n.target}.{k}", at[n])
    return first


# -- the config -------------------------------------------------------------------------
def _candidates(source: nn.Module, state: dict, lengths: dict[str, int]):
    """(config, shape mismatches of the class built with it) per plausible config, likeliest
    first: widths from the merged extents, heads kept or scaled with the hidden size."""
    cfg0, own = source.config, source.config.to_dict()
    keys, old, seen = _widths(source, state)
    ratio = seen["hidden"][0] / old["hidden"] if "hidden" in seen else 1
    scaled = lambda v: [v] + ([int(v * ratio)] if v * ratio == int(v * ratio) != v else [])
    options = {r: seen.get(r) or scaled(v) for r, v in old.items()}
    if "head_dim" in options:
        options["head_dim"] += [seen["hidden"][0] // h for h in options.get("heads", ())
                                if "hidden" in seen and seen["hidden"][0] % h == 0]
    layers = _layer_counts(own, source, lengths)
    roles = list(options)
    for values in itertools.product(*(dict.fromkeys(options[r]) for r in roles)):
        cfg = copy.deepcopy(cfg0)
        for r, v in zip(roles, values):
            setattr(cfg, keys[r], v)
        for k, (n_old, n_new) in layers.items():
            _set_layers(cfg, own, k, n_old, n_new)
        try:
            with torch.device("meta"):
                model = type(source)(cfg)
        except Exception as e:      # noqa: BLE001  (e.g. hidden size not a multiple of heads)
            yield cfg, [f"the class does not build with it ({type(e).__name__}: {e})"]
            continue
        yield cfg, _mismatch(model, state)


def _widths(source: nn.Module, state: dict, in_layers: bool = False) -> tuple[dict, dict, dict]:
    """Per role: A's config key, its value, and (hidden, embedding, intermediate sizes) the
    merged extents, most frequent first, of the dims (of layers') that had that extent in A."""
    own = source.config.to_dict()
    keys = {r: k for r, names in ROLES.items()
            for k in [next((k for k in names if isinstance(own.get(k), int) and own[k] > 0), None)]
            if k}
    old = {r: own[k] for r, k in keys.items()}
    shapes = [(state[k].shape, v.shape) for k, v in source.state_dict().items() if k in state
              and state[k].dim() == v.dim() and (not in_layers or re.search(r"\.\d+\.", k))]
    seen = {r: [e for e, _ in Counter(new[d] for new, s in shapes for d, e in enumerate(s)
                                      if e == v).most_common()]
            for r, v in old.items() if r in ("hidden", "embedding", "inter")}
    return keys, old, {r: e for r, e in seen.items() if e}


def _layer_counts(own: dict, source: nn.Module, lengths: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for k in LAYERS:
        n = own.get(k)
        new = {lengths[p] for p in lengths if isinstance(n, int)
               and len(source.get_submodule(p)) == n}
        if len(new) > 1:
            raise RebuildError(f"the layer lists counted by config key '{k}' now have different "
                               f"lengths {sorted(new)}")
        if new and new != {n}:
            out[k] = (n, new.pop())
    return out


def _set_layers(cfg, own: dict, key: str, n_old: int, n_new: int) -> None:
    """Set the layer count, and per-layer lists (``layer_types``) when all their entries agree."""
    setattr(cfg, key, n_new)
    for k, v in own.items():
        if isinstance(v, list) and len(v) == n_old and n_old > 0:
            if any(x != v[0] for x in v):
                raise RebuildError(f"config key '{k}' differs from layer to layer; hmir cannot "
                                   f"tell which entry an inserted layer takes")
            setattr(cfg, k, [v[0]] * n_new)


def _tied(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another (kept) name."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - \
        {n for n, _ in model.named_parameters()}


def _mismatch(model: nn.Module, state: dict) -> list[str]:
    want, tied = {k: tuple(v.shape) for k, v in model.state_dict().items()}, _tied(model)
    bad = [f"{k}: no such tensor in the class" for k in state if k not in want]
    bad += [f"{k}: missing from the merged weights" for k in want if k not in state and k not in tied]
    return bad + [f"{k}: merged {tuple(state[k].shape)}, class {want[k]}" for k in want
                  if k in state and tuple(state[k].shape) != want[k]]


def _no_fit(source: nn.Module, state: dict, tried: list) -> str:
    bad = min((b for _, b in tried), key=len)
    keys, _, seen = _widths(source, state, in_layers=True)
    mixed = [f"{keys[r]} would be {sorted(v)} in different layers" for r, v in seen.items()
             if len(v) > 1]
    why = "layers of different widths (" + "; ".join(mixed) + "); " if mixed else ""
    return f"{why}no config of {type(source).__name__} fits the merged tensors " \
           f"({len(bad)} mismatch(es), e.g. {'; '.join(bad[:3])})"


# -- weights and parity -----------------------------------------------------------------
def _load(model: nn.Module, state: dict) -> nn.Module:
    ref = next(t for t in state.values() if t.is_floating_point())
    model.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = sorted(set(missing) - _tied(model))
    if left or unexpected:
        raise RebuildError(f"the weights do not load: missing {left[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _parity(gm: nn.Module, model: nn.Module, x) -> float:
    """Relative max difference of ``model``'s outputs from ``gm``'s (those ``gm`` returns)."""
    with torch.no_grad():
        want, got = gm(x), model(x)
    pairs = [(w, got.get(k) if isinstance(got, dict) else None) for k, w in want.items()] \
        if isinstance(want, dict) else list(zip(*(
            [y] if isinstance(y, torch.Tensor) else list(y) for y in (want, got))))
    pairs = [(w, g) for w, g in pairs if isinstance(w, torch.Tensor)]
    if not pairs or any(not isinstance(g, torch.Tensor) or g.shape != w.shape for w, g in pairs):
        return float("inf")
    return max(float((w - g).abs().max() / w.abs().max().clamp_min(1e-12)) for w, g in pairs)
