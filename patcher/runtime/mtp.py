"""MTP（多 token 预测）模块与无损投机解码。

与 ``modeling.py`` 一样只依赖 torch 与 transformers，转换时随 ``modeling_dsopt.py`` 一起复制到输出目录。

第 k 个 MTP 模块（DeepSeek-V3）：位置 i 上把上一级的隐藏状态 h_i（k=1 时是基座最后一层的输出）与
token t_{i+k} 的嵌入各做 RMSNorm、拼接、投影回隐藏维，过一个 transformer 块，再经自己的末层归一化与
基座共享的输出头，预测 t_{i+k+1}。嵌入与输出头都与基座共享。

解码：每一轮各 MTP 模块依次起草（贪心时每个模块在上一级的每个草稿之后给出几个候选，成一棵树，见
``ModuleDrafts``），基座一次前向验证全部草稿。贪心时接受与基座贪心预测一致的最长路径，再加上基座在第一个
不一致处的 token，所以输出与普通贪心逐 token 相同；
采样时用 Leviathan 等人的投机采样（接受概率 min(1, p/q)，拒绝时从 (p−q)+ 重采样），
输出分布与基座相同。被拒绝的草稿从基座与各 MTP 模块的缓存中裁掉。

可选的上下文查找草稿（``lookup``，即 prompt lookup decoding，Saxena 2023）：上下文（提示与已生成部分）末尾的
n-gram 若在前文出现过，就把它上次出现之后的那几个 token 也当作这一步的草稿。2-gram 的匹配单独起草；只有
1-gram 匹配或没有匹配时由 MTP 模块起草。贪心时所有草稿（模块的树、查找的续写）合成
一棵草稿树（``DraftTree``）由基座一次验证；采样时只验证一条链。输出同样与普通贪心逐 token 相同（采样时分布不变）。
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time

import torch
from torch import nn
from transformers import DynamicCache

try:
    from transformers.masking_utils import create_causal_mask
except ImportError:  # pragma: no cover - older transformers
    create_causal_mask = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class MTPModule(nn.Module):
    """One DeepSeek-V3 MTP depth: ``block(eh_proj([hnorm(h); enorm(emb)]))``, then ``norm`` before the shared head."""

    def __init__(self, hidden_size: int, eps: float, block: nn.Module, norm: nn.Module, draft_vocab: int = 0):
        super().__init__()
        # token ids a draft may propose (most frequent first); empty = the whole vocabulary. Drafting against a
        # few thousand frequent tokens instead of the full output head is what makes a draft cheap (FR-Spec);
        # verification still uses the full head, so the output stays exact.
        self.register_buffer("draft_ids", torch.zeros(draft_vocab, dtype=torch.long))
        self.hnorm = RMSNorm(hidden_size, eps)
        self.enorm = RMSNorm(hidden_size, eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.norm = norm

    def forward(self, model, hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of this depth at ``positions`` (1-D); ``cache`` holds this module's own past, if any.
        ``mask``: an additive attention mask over cache + rows (a draft tree's), else causal."""
        x = self.eh_proj(torch.cat([self.hnorm(hidden), self.enorm(embeds)], -1))
        pos = positions[None].expand(x.shape[0], -1)
        if mask is None:
            mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=cache,
                                      position_ids=pos)
        rotary_path = model.config.dsopt.get("rotary_path")
        extra = {}
        if rotary_path:  # families without RoPE (GPT-2) carry positions in the hidden state already
            rotary = model.get_submodule(rotary_path)
            # Gemma 3's rotary differs by layer kind: the block's own kind (its attention knows it)
            kind = getattr(getattr(self.block, "self_attn", None), "layer_type", None)
            takes = kind is not None and "layer_type" in inspect.signature(rotary.forward).parameters
            extra["position_embeddings"] = rotary(x, pos, **({"layer_type": kind} if takes else {}))
        out = self.block(x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=cache is not None, **extra)
        return out[0] if isinstance(out, tuple) else out


def body_of(model: nn.Module) -> nn.Module:
    """The decoder stack without the head, whose output has ``last_hidden_state`` (``base_model`` is the whole
    model where the family's prefix names no attribute: Llama 4)."""
    return model.get_submodule(model.config.dsopt["layers_path"].rsplit(".", 1)[0])


def _block_from(layer: nn.Module) -> nn.Module:
    """A copy of a decoder layer that caches as layer 0 of its own cache."""
    block = copy.deepcopy(layer)
    for m in block.modules():
        if hasattr(m, "layer_idx"):
            m.layer_idx = 0
    return block


def build_mtp(model: nn.Module, config) -> nn.ModuleList:
    """The MTP modules ``config.dsopt["mtp"]`` records, shaped after the source decoder layer and final norm."""
    rec = config.dsopt["mtp"]
    layers = model.get_submodule(config.dsopt["layers_path"])
    norm = model.get_submodule(rec["norm_path"])
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", 1e-6)
    mods = nn.ModuleList(MTPModule(config.hidden_size, eps, _block_from(layers[rec["source_layer"]]),
                                   copy.deepcopy(norm), rec.get("draft_vocab", 0)) for _ in range(rec["heads"]))
    ref = next(layers.parameters())
    return mods.to(device=ref.device, dtype=ref.dtype)


def choose_draft_vocab(model, ids: torch.Tensor) -> None:
    """Fill each MTP module's ``draft_ids`` with the most frequent tokens of ``ids`` (then the lowest ids)."""
    for mod in model.mtp:
        n = mod.draft_ids.numel()
        if n:
            counts = torch.bincount(ids.flatten().cpu(), minlength=model.config.vocab_size).float()
            counts[: model.config.vocab_size] += 1e-6 * torch.arange(model.config.vocab_size, 0, -1)  # ties: low ids
            mod.draft_ids.copy_(counts.topk(n).indices.to(mod.draft_ids.device))


class DraftHead:
    """The shared output head restricted to a module's draft vocabulary (full head when it has none).

    Training and acceptance measurement use it too: a draft can only ever be one of these tokens."""

    def __init__(self, head: nn.Module, ids: torch.Tensor):
        self.ids = ids if ids.numel() else None
        self.weight = head.weight if self.ids is None else head.weight[self.ids]
        bias = getattr(head, "bias", None)
        self.bias = bias if bias is None or self.ids is None else bias[self.ids]
        self.vocab = head.weight.shape[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (index i is token ``token_ids(i)``)."""
        return nn.functional.linear(h, self.weight, self.bias)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        return index if self.ids is None else self.ids[index]

    def top(self, h: torch.Tensor, n: int) -> list:
        """The ``n`` most likely draft tokens, best first (a list per row when ``h`` holds several)."""
        return self.token_ids(self.logits(h).topk(n).indices).tolist()

    def pick(self, h: torch.Tensor, temperature: float, generator) -> tuple[int, torch.Tensor | None]:
        i, q = _pick(self.logits(h), temperature, generator)
        if self.ids is None:
            return i, q
        full = None if q is None else torch.zeros(self.vocab, dtype=q.dtype, device=q.device).index_copy_(0, self.ids, q)
        return int(self.ids[i]), full


def _crop_to(cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (transformers' ``crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _keep_rows(cache, start: int, rows: list[int]) -> None:
    """Keep the first ``start`` positions and then new positions ``start + rows`` (ascending) of every layer:
    the verified path through a draft tree. The kept rows are moved down in place, then the rest cropped."""
    if rows != list(range(len(rows))):
        src = torch.tensor(rows, device=cache.layers[0].keys.device) + start
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                t[..., start: start + len(rows), :] = t[..., src, :]
    _crop_to(cache, start + len(rows))


def tree_mask(parents: list[int], cached: int, dtype, device, positions: list[int] | None = None,
              window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """Additive attention mask of shape (1, 1, rows, cached + rows) for rows that form a forest: row r sees all
    ``cached`` positions, its ancestors (``parents[r]``, −1 for none; parents come first) and itself. ``window``
    (with the rows' ``positions``): also drop keys ``window`` or more positions back, as sliding layers do;
    ``chunk``: keep only keys in the row's own chunk of that many positions, as Llama 4's chunked layers do."""
    n = len(parents)
    seen = torch.eye(n, dtype=torch.bool)
    for r, p in enumerate(parents):
        if p >= 0:
            seen[r] |= seen[p]
    seen = torch.cat([torch.ones(n, cached, dtype=torch.bool), seen], 1)
    if window is not None or chunk is not None:
        rows = torch.tensor(positions)
        cols = torch.cat([torch.arange(cached), rows])
        if window is not None:
            seen &= rows[:, None] - cols[None, :] < window
        if chunk is not None:
            seen &= rows[:, None] // chunk == cols[None, :] // chunk
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[None, None].to(device)


class DraftTree:
    """Candidate continuations merged into a trie and verified by the base in one forward (greedy decoding).

    Input row 0 is the last verified token (the root); node j is row j + 1. A row sees the cached context, the
    root and its own ancestors, at position context + depth, so every branch is scored as if it were alone
    (SpecInfer / Medusa tree attention). A single path is a plain causal run and needs no mask."""

    def __init__(self, paths: list[list[int]]):
        self.tokens: list[int] = []
        self.parents: list[int] = []  # -1 = the root
        self.depths: list[int] = []
        self.child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for path in paths:
            node = -1
            for t in path:
                if (node, t) not in self.child:
                    self.child[(node, t)] = len(self.tokens)
                    self.tokens.append(t)
                    self.parents.append(node)
                    self.depths.append(1 if node < 0 else self.depths[node] + 1)
                node = self.child[(node, t)]

    def is_chain(self) -> bool:
        return all(p == j - 1 for j, p in enumerate(self.parents))

    def attention_mask(self, context: int, dtype, device, window: int | None = None,
                       chunk: int | None = None) -> torch.Tensor:
        """Additive mask of shape (1, 1, 1 + nodes, context + 1 + nodes). ``window``: a sliding-window layer's
        reach, as transformers defines it (a query sees keys less than ``window`` positions back); ``chunk``: a
        chunked layer's chunk size."""
        return tree_mask([-1] + [p + 1 for p in self.parents], context, dtype, device,
                         [context] + [context + d for d in self.depths], window, chunk)

    def attention_masks(self, config, context: int, dtype, device):
        """The verification mask as the base model takes it: None for a single path (the model's own causal
        mask), else one mask, or one per layer type when full and sliding-window layers are mixed."""
        if self.is_chain():
            return None
        window = getattr(config, "sliding_window", None)
        chunk = getattr(config, "attention_chunk_size", None)
        types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
        masks = {t: self.attention_mask(context, dtype, device, window if t == "sliding_attention" else None,
                                        chunk if t == "chunked_attention" else None) for t in types}
        return masks.popitem()[1] if len(masks) == 1 else masks

    def walk(self, choice: list[int]) -> tuple[list[int], int]:
        """Follow the base's token at each row (``choice[row]``) from the root while a node holds it.
        Returns the accepted nodes and the base's token after the last of them."""
        node, path = -1, []
        while (node, choice[node + 1]) in self.child:
            node = self.child[(node, choice[node + 1])]
            path.append(node)
        return path, choice[node + 1]


def draft_widths(branches, heads: int) -> tuple[int, ...]:
    """Candidates per draft at each of ``heads`` depths from ``branches`` (an int: the first module's; a sequence:
    per module; modules past it propose 1)."""
    widths = tuple(branches) if isinstance(branches, (tuple, list)) else (int(branches),)
    if not widths or min(widths) < 1:
        raise ValueError(f"branches 每项至少为 1，得到 {branches!r}")
    return (widths + (1,) * heads)[:heads]


def parse_widths(text: str) -> tuple[int, ...]:
    """A draft tree's widths written as "4,2" (or "4/2"); ValueError unless every one is a positive integer."""
    widths = tuple(int(w) for w in text.replace("/", ",").split(","))
    draft_widths(widths, len(widths))  # the same check generation applies
    return widths


def tree_nodes(widths: tuple[int, ...]) -> int:
    """Drafts in a modules' tree of these widths: w1 + w1·w2 + …"""
    total, level = 0, 1
    for w in widths:
        level *= w
        total += level
    return total


class ModuleDrafts:
    """One step of drafting by the MTP modules: a tree of candidates, ``widths[k-1]`` best tokens per node at
    depth k − 1 (one width per module, see ``draft_widths``); sampling (``widths`` empty) draws one chain.

    Depth k at position i reads depth k−1 at i and token i+k, so with the base at positions ..m−1 and token m
    verified, module k's rows at positions ≤ m−k are final (cached for good) and those at m−k+1..m−1 read drafts.
    Those draft rows are one per tree node u of depth 1..k−1, at position m−k+depth(u), attending to the final rows
    and their own ancestors; the rows of depth k−1 (position m−1) give the candidates of depth k. Each row thus
    computes what it would if its path were the text (the tree's masks), and a tree costs each module one call.
    Updates ``hid``/``final``/``mcaches`` (per depth: final hidden states, how many, the module's cache)."""

    def __init__(self, model, mtp, draft_heads, tokens, m, hid, final, mcaches, widths, temperature, generator):
        self.tokens, self.parents, self.depths = [], [], []  # the tree's nodes (parents before children)
        self.chain, self.qs = [], []  # the best path (each node's first candidate) and, sampling, its proposals
        embed, dev = model.get_input_embeddings(), hid[0].device
        frontier, chain_node, prev = [-1], -1, {}  # nodes to expand (−1 = the root); prev: node -> last module's row
        for k, mod in enumerate(mtp, start=1):
            first = m - k + 1  # the position of the depth-1 rows; final rows: positions start..stop−1
            start, stop = final[k], max(first, 0)
            _crop_to(mcaches[k - 1], start)
            nodes = [u for u in range(len(self.tokens)) if first - 1 + self.depths[u] >= 0]
            row = {u: stop - start + j for j, u in enumerate(nodes)}
            last = stop - start - 1  # the last final row (−1: none yet, a prompt shorter than the depth)
            parents = [r - 1 for r in range(stop - start)] + [row.get(self.parents[u], last) for u in nodes]
            # a draft row reads its parent's row of the module before (depth 1: that module's last final row)
            h = torch.cat([hid[k - 1][start:stop]] + [(prev[self.parents[u]] if self.depths[u] > 1
                                                       else hid[k - 1][first])[None] for u in nodes])
            ids = tokens[start + k: m + 1] + [self.tokens[u] for u in nodes]
            pos = list(range(start, stop)) + [first - 1 + self.depths[u] for u in nodes]
            out = mod(model, h[None], embed(torch.tensor(ids, device=dev))[None], torch.tensor(pos, device=dev),
                      mcaches[k - 1], tree_mask(parents, start, h.dtype, dev) if nodes else None)[0]
            hid[k] = torch.cat([hid[k][:start], out[: stop - start]])
            final[k] = stop
            _crop_to(mcaches[k - 1], stop)
            prev = {u: out[row[u]] for u in nodes}
            h_f = mod.norm(torch.stack([out[last] if f < 0 else prev[f] for f in frontier]))
            if widths:  # one product for the whole frontier: reading the draft head's rows is the cost
                best = draft_heads[k - 1].top(h_f, widths[k - 1])
            else:
                d, q = draft_heads[k - 1].pick(h_f[0], temperature, generator)
                best = [[d]]
                self.qs.append(q)
            grown = []
            for f, cands in zip(frontier, best):
                for j, t in enumerate(cands):
                    grown.append(len(self.tokens))
                    if f == chain_node and j == 0:
                        self.chain.append(t)
                    self._add(t, f)
            chain_node = next(u for u in grown if self.parents[u] == chain_node)
            frontier = grown

    def _add(self, token: int, parent: int) -> None:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)

    def matched(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` follow a path of the tree: the depth the modules' drafts were right to."""
        node, depth = -1, 0
        for t in tokens:
            node = next((u for u, (p, d) in enumerate(zip(self.parents, self.tokens)) if p == node and d == t), None)
            if node is None:
                break
            depth += 1
        return depth

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path's tokens, in the order of the leaves (what ``DraftTree`` merges)."""
        has_child = set(self.parents)
        out = []
        for u in range(len(self.tokens)):
            if u not in has_child:
                path, v = [], u
                while v >= 0:
                    path.append(self.tokens[v])
                    v = self.parents[v]
                out.append(path[::-1])
        return out


def _pick(logits: torch.Tensor, temperature: float, generator) -> tuple[int, torch.Tensor | None]:
    if temperature <= 0:
        return int(logits.argmax()), None
    p = torch.softmax(logits.float() / temperature, -1)
    return int(torch.multinomial(p, 1, generator=generator)), p


def _one_hot(d: int, vocab: int, device) -> torch.Tensor:
    """A deterministic draft's proposal distribution, for speculative sampling."""
    return torch.zeros(vocab, device=device).index_fill_(0, torch.tensor([d], device=device), 1.0)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, d: int, generator=None) -> tuple[bool, int]:
    """Speculative sampling step (Leviathan et al.): keep draft ``d`` ~ q with probability min(1, p(d)/q(d)),
    else draw from (p − q)+ normalised. The token that comes out is distributed exactly as p."""
    if float(torch.rand((), generator=generator)) < min(1.0, float(p[d] / q[d].clamp_min(1e-20))):
        return True, d
    resid = (p - q).clamp_min(0)
    if float(resid.sum()) <= 0:  # p == q up to rounding: any draw from p is right
        resid = p
    return False, int(torch.multinomial(resid / resid.sum(), 1, generator=generator))


def lookup_drafts(tokens: list[int], max_ngram: int, limit: int) -> tuple[list[int], int]:
    """Up to ``limit`` tokens that followed the latest earlier occurrence of the context's last n-gram, trying the
    longest n (≤ ``max_ngram``) first, and that n; ``([], 0)`` when none recurs. Repetitive text (quotes, lists,
    code, a model's own loops) makes these long and right; the base verifies them like any draft."""
    if limit <= 0:
        return [], 0
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first, never the tail itself
            if tokens[start:start + n] == tail:
                return tokens[start + n: start + n + limit], n
    return [], 0


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(),
                         temperature: float = 0.0, heads: int | None = None, generator=None,
                         lookup: int = 0, lookup_ngram: int = 2,
                         branches: int | tuple[int, ...] = 1) -> tuple[torch.Tensor, dict]:
    """Generate with the MTP modules drafting and the base verifying; batch 1. Returns (ids, statistics).

    ``lookup`` > 0: when the context's last n-gram (n ≤ ``lookup_ngram``) recurs, up to ``lookup`` tokens that
    followed it are drafted too (see ``lookup_drafts``). ``branches``: how many best tokens module k proposes
    after each draft of depth k−1 (per module, the first module first; an int is the first module's, and a
    module past the list proposes 1), so (4, 2) drafts 4 tokens for t+1 and 2 after each of them for t+2.

    Greedy decoding verifies every candidate at once as a ``DraftTree`` (the modules' tree and the lookup
    continuation) and keeps the longest path the base agrees with. Sampling verifies one chain, as speculative
    sampling is defined for: the lookup continuation when there is one, else the modules' chain."""
    if input_ids.shape[0] != 1:
        raise ValueError("MTP 投机解码只支持批大小 1")
    mtp = list(model.mtp)[: heads or len(model.mtp)]
    k_max = len(mtp)
    widths = draft_widths(branches, k_max)
    base, head = body_of(model), model.get_output_embeddings()
    dev = input_ids.device
    eos = set(eos_token_ids or ())
    greedy = temperature <= 0
    t0 = time.perf_counter()

    # full history in every layer, sliding-window ones too: rejected drafts are cut from the end, which a
    # window-sized cache cannot undo once it has dropped older entries; the masks still apply the window
    cache = DynamicCache()
    h = base(input_ids=input_ids, cache=cache, use_cache=True).last_hidden_state[0]
    first, _ = _pick(head(h[-1]), temperature, generator)
    tokens = input_ids[0].tolist() + [first]
    prompt_len = input_ids.shape[1]
    hid = [h] + [h[:0]] * k_max         # per depth: hidden states of positions 0.. (depth 0 is the base)
    final = [0] * (k_max + 1)            # per depth: leading positions whose cache entries used verified tokens only
    mcaches = [DynamicCache() for _ in mtp]
    draft_heads = [DraftHead(head, mod.draft_ids) for mod in mtp]
    accepted = [0] * k_max               # per depth: steps whose output began with a path of the modules' tree
                                         # at least k+1 deep
    module_steps = 0
    produced = {"mtp": [], "lookup": []}  # tokens each verification step yielded, by whether lookup drafted
    while len(tokens) - prompt_len < max_new_tokens and tokens[-1] not in eos:
        m = len(tokens) - 1  # the base has seen positions 0..m-1; tokens[m] is verified but not yet fed
        # a step yields at most drafts + 1 tokens: never draft past the budget
        found, n_match = lookup_drafts(tokens, lookup_ngram,
                                       min(lookup, max_new_tokens - (len(tokens) - prompt_len) - 1))
        # a recurring 2-gram is right often enough to draft alone (the modules catch up on a later step); a lone
        # recurring token is not, so greedy decoding lets the modules' drafts join it in the tree. SmolLM2, 12
        # prompts: 3.15 tokens/step against 2.88 when every match drafted alone, 39.0 vs 37.6 tok/s; the modules
        # on every step gave 3.17 but 36.7 tok/s. Sampling checks one chain, so there any match drafts alone.
        use_modules = not found or (greedy and n_match < 2)
        drafts = ModuleDrafts(model, mtp if use_modules else [], draft_heads, tokens, m, hid, final, mcaches,
                              widths if greedy else (), temperature, generator)
        chain, qs = drafts.chain, drafts.qs
        module_steps += bool(chain)
        if greedy:
            tree = DraftTree([found] + drafts.paths())
        else:
            tree = DraftTree([found or chain])
            qs = [_one_hot(d, head.weight.shape[0], dev) for d in found] if found else qs
        rows = [tokens[m]] + tree.tokens
        hv = base(input_ids=torch.tensor([rows], device=dev), cache=cache, use_cache=True,
                  position_ids=torch.tensor([[m] + [m + d for d in tree.depths]], device=dev),
                  attention_mask=tree.attention_masks(model.config, m, h.dtype, dev)).last_hidden_state[0]
        logits = head(hv)
        if greedy:
            path, bonus = tree.walk(logits.argmax(-1).tolist())
            new = [tree.tokens[j] for j in path] + [bonus]
        else:
            path, new = [], []
            for j, d in enumerate(tree.tokens):  # a chain: node j is draft j
                ok, fix = accept_or_resample(torch.softmax(logits[j].float() / temperature, -1), qs[j], d, generator)
                new.append(fix)
                if not ok:  # the base's own token where the draft went wrong
                    break
                path.append(j)
            else:
                new.append(_pick(logits[len(tree.tokens)], temperature, generator)[0])  # bonus after all drafts
        reached = drafts.matched(new)
        for k in range(len(chain)):
            accepted[k] += reached > k
        kept = [0] + [j + 1 for j in path]  # input rows on the verified path: the root and the accepted nodes
        _keep_rows(cache, m, kept)
        hid[0] = torch.cat([hid[0], hv[kept]])
        produced["lookup" if found else "mtp"].append(len(new))
        for t in new:
            tokens.append(t)
            if t in eos or len(tokens) - prompt_len >= max_new_tokens:
                break
    seconds = time.perf_counter() - t0
    out_ids = torch.tensor([tokens[: prompt_len + max_new_tokens]], device=dev)
    n_new = out_ids.shape[1] - prompt_len
    by_mtp, by_lookup = produced["mtp"], produced["lookup"]
    steps = len(by_mtp) + len(by_lookup)
    stats = {"new_tokens": n_new, "verify_steps": steps, "seconds": seconds,
             "tokens_per_s": n_new / seconds if seconds else 0.0,
             "accepted_per_step": (sum(by_mtp) + sum(by_lookup)) / steps if steps else 0.0,
             "head_acceptance": [a / module_steps if module_steps else 0.0 for a in accepted],
             "mtp_steps": len(by_mtp), "lookup_steps": len(by_lookup),
             "accepted_per_step_mtp": statistics.mean(by_mtp) if by_mtp else 0.0,
             "accepted_per_step_lookup": statistics.mean(by_lookup) if by_lookup else 0.0}
    return out_ids, stats
