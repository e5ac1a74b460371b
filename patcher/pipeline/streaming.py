"""流式转换：大模型一层一层地读入、校准、转换、写出，内存约为一层加激活；中断后 ``--resume`` 接着做。

与内存后端跑同一个阶段序列（``run.py``）、同一批技术，区别只在模型从哪里来、到哪里去：

1. 模型骨架建在 meta 设备上（参数不占内存），定位器在骨架上追踪；层外的张量（嵌入、末层归一化、输出头）
   读进内存，解码层的权重用到时才从 safetensors 读入（以 float32 计算：CPU 上 bf16 矩阵乘法慢得多）；
2. 第 i 层：评估窗口先经过*源*层（基座）；收集校准统计；转换器就地替换模块；校准与评估窗口再经过*转换后*
   的层；该层按源 dtype 写成一个分片，然后释放；
3. 每层完成后，下一层的输入（校准与评估的隐藏状态）和已完成层的记录原子地存进工作目录 ``.OUT.partial/``；
   ``--resume`` 从最后完成的层接着做，写出的权重字节与一次跑完的相同（测试里真的杀掉进程来验证）；
4. 最后用末层归一化和输出头把两路隐藏状态变成 log 概率：保真度指标与内存中的管线完全相同；MTP 模块由
   转换后的层（从它的分片读回）和末层归一化组成；索引从磁盘上的分片生成，与模型结构核对后整个目录改名。

需要先看完所有层的全局规划（敏感度探测、按谱分配秩、解耦 RoPE 的频率选择、MTP 训练）流式模式不做
（``LIMITS``）：技术的缺省选项换成它声明的逐层做法并写进报告，显式要求这些功能时报错。
有 GPU 时，层的前向（校准、评估）在 GPU 上逐层执行；分解（SVD）在 CPU 上以 float64 做。
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from converters.moe import balance_record, routing_counts
from converters.mtp import init_eh_proj

from ..errors import OutputError, SourceError
from ..evaluation.metrics import active_parameters, compare, evaluate_base, parameter_count
from ..evaluation.report import write_report
from ..files import disk_guard
from ..formats import folder
from ..formats.shards import LazyWeights, read_shard, shard_name, write_index, write_shard
from ..model import sources
from ..model.compat import cache_argument
from ..model.locate import final_norm_path
from ..recipe import Recipe
from ..runtime.modeling import MoEMLP
from ..runtime.mtp import choose_draft_vocab
from ..version import __version__
from .calibrate import call_layer, capture_layer_inputs, collect
from .progress import rss_mib
from .run import Limits, dsopt_config

COMPUTE_DTYPE = torch.float32
AUTO_BYTES = 2 * 1024 ** 3  # --streaming auto: sources whose weights exceed this are streamed
STATE_DIR = "stream-state"
PROMPT_TOKENS = 64  # the prompt the per-layer cache measurement writes
LIMITS = Limits(planning=frozenset({"none", "per_layer"}), formats=frozenset({"dsopt"}), why="流式转换逐层规划")


def wanted(src_bytes: int, recipe: Recipe) -> bool:
    mode = recipe.output.streaming
    return mode == "on" or (mode == "auto" and src_bytes > AUTO_BYTES)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(obj, device):
    """Tensors inside tuples / lists / dicts moved to ``device`` (a no-op on CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _forward(layer: nn.Module, inputs: list, device) -> list:
    """Every batch through one layer (on ``device``); results come back to the CPU."""
    layer.to(device)
    with torch.no_grad():
        out = [(call_layer(layer, _to(h, device), _to(kw, device)).cpu(), kw) for h, kw in inputs]
    layer.to("cpu")
    return out


def _release(module: nn.Module) -> None:
    """Drop a layer's weights (back to meta): what is written need not stay in memory."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        if getattr(m, "last_routing", None) is not None:  # an MoE layer's routing of its last batch
            m.last_routing = None
    _trim()


def _trim() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it otherwise, and RSS creeps up by tens of MiB a layer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _weight_name(model: nn.Module, module: nn.Module) -> str:
    path = next(name for name, m in model.named_modules(remove_duplicate=False) if m is module)
    return f"{path}.weight"


def _cache_elements(layer: nn.Module, prompt: list) -> int:
    """Elements per token that ``layer`` writes into a real cache object for a prompt."""
    from transformers import DynamicCache

    hidden, kwargs = prompt[0]
    cache = DynamicCache()
    name = cache_argument(layer)
    with torch.no_grad():
        layer(hidden, **{**kwargs, name: cache, "use_cache": True})
    total = sum(t.numel() for lay in cache.layers for t in (lay.keys, lay.values) if isinstance(t, torch.Tensor))
    return total // hidden.shape[1]


class _Inject(nn.Module):
    """Stands in for the whole decoder stack: returns the stored final hidden state (or its input)."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = None, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


class _ZeroEmbedding(nn.Module):
    """Stands in for the token embedding while ``_Inject`` supplies the hidden states (so it need not be loaded)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        # families read the embedding's device from its weight (Llama 4): an empty one answers that
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.hidden_size, dtype=COMPUTE_DTYPE)


class _Stack:
    """Swap the decoder stack for one ``_Inject``: the family's own forward then does norm, head and any softcap."""

    def __init__(self, model: nn.Module, layers_path: str, as_tuple: bool):
        parent, _, self.attr = layers_path.rpartition(".")
        self.parent = model.get_submodule(parent) if parent else model
        self.inject = _Inject(as_tuple)
        self.model = model

    def __enter__(self):
        self.saved = getattr(self.parent, self.attr), self.model.get_input_embeddings()
        setattr(self.parent, self.attr, nn.ModuleList([self.inject]))
        self.model.set_input_embeddings(_ZeroEmbedding(self.model.config.hidden_size))
        return self

    def __exit__(self, *exc):
        setattr(self.parent, self.attr, self.saved[0])
        self.model.set_input_embeddings(self.saved[1])
        return False

    def logits(self, hidden: list):
        def fn(i, window):
            self.inject.hidden = hidden[i][0]
            try:
                with torch.no_grad():
                    return self.model(input_ids=window[None], use_cache=False).logits[0]
            finally:
                self.inject.hidden = None
        return fn


class Run:
    """工作目录 ``.OUT.partial/``：已完成层的分片，加 ``stream-state/``（下一层的输入与已完成层的记录）。

    ``progress.json`` 是提交点：分片与隐藏状态都写好之后才更新它，所以任何时刻被杀掉，磁盘上都是一个
    一致的“做完了第 done 层”的状态。"""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.out = Path(out)
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        self.state = self.dir / STATE_DIR
        self.saved = None
        if self.dir.exists():
            if not resume:
                raise OutputError(f"{self.dir} 里有一次未完成的流式转换：加 --resume 接着做，或删除该目录重新开始")
            path = self.state / "progress.json"
            if path.exists():
                self.saved = json.loads(path.read_text())
                if self.saved["fingerprint"] != fingerprint:
                    raise OutputError(f"{self.dir} 中未完成的转换来自不同的来源、配方或 dsopt 版本，不能续做；"
                                      "删除该目录重新开始")
        self.state.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    @property
    def done(self) -> int:
        return self.saved["done"] if self.saved else -1

    def hidden(self) -> dict[str, torch.Tensor]:
        return read_shard(self.state / f"hidden-{self.done}.safetensors")

    def commit(self, i: int, hidden: dict[str, torch.Tensor], record: dict) -> None:
        write_shard(self.state, f"hidden-{i}.safetensors", hidden)  # temporary name, then renamed
        self.saved = {"fingerprint": self.fingerprint, "done": i, **record}
        tmp = self.state / ".progress.tmp"
        tmp.write_text(json.dumps(self.saved))
        os.replace(tmp, self.state / "progress.json")
        for old in self.state.glob("hidden-*.safetensors"):
            if old.name != f"hidden-{i}.safetensors":
                old.unlink()

    def finish(self, overwrite: bool, source: Path) -> None:
        shutil.rmtree(self.state)
        folder.check_output(self.out, overwrite, keep=(source,))
        folder.replace_dir(self.dir, self.out)


def _fingerprint(folder: Path, store: LazyWeights, recipe: Recipe) -> dict:
    files = sorted(set(store.weight_map.values()))
    return {"dsopt_version": __version__, "source": str(Path(folder).resolve()),
            "weights": [[f, (Path(folder) / f).stat().st_size, (Path(folder) / f).stat().st_mtime_ns] for f in files],
            "recipe": recipe.model_dump(mode="json", exclude={"output": {"overwrite", "streaming"}})}


def loading_renames(model, names: list[str], wanted: set[str]) -> dict[str, str]:
    """``{stored name: model name}`` for the ``names`` that transformers' own renaming rules for this model turn into
    a ``wanted`` name (tensors it merges or splits are not renames and stay unmatched)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    rules = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    out = {}
    for name in names:
        new = rename_source_key(name, rules, [])[0]
        if new != name and new in wanted:
            out[name] = new
    return out


def loading_merges(model, names: list[str], wanted: set[str]) -> dict[str, tuple[list[list[str]], int, int | None]]:
    """``{model name: (groups of stored names, stack dim, cat dim)}`` for the ``wanted`` tensors transformers' own
    rules for this model build by stacking per-expert tensors and concatenating the stacks (Qwen3-MoE's
    ``gate_up_proj``, ``down_proj``); the format of ``LazyWeights.merge``. Other conversions stay unmatched."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    rules = get_model_conversion_mapping(model)
    renames = [r for r in rules if isinstance(r, WeightRenaming)]
    named = {rename_source_key(n, renames, [])[0]: n for n in names}  # patterns apply after renaming (Mixtral)
    out = {}
    for rule in rules:
        ops = getattr(rule, "operations", [])
        if not (isinstance(rule, WeightConverter) and len(rule.target_patterns) == 1 and 1 <= len(ops) <= 2
                and isinstance(ops[0], MergeModulelist) and all(isinstance(o, Concatenate) for o in ops[1:])
                and (len(ops) == 2 or len(rule.source_patterns) == 1)):
            continue
        found: dict[str, list[dict[int, str]]] = {}  # prefix -> per source pattern: {expert index: stored name}
        for j, pattern in enumerate(rule.source_patterns):
            rx = re.compile("^(.*?)" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
            for name, stored in named.items():
                if m := rx.match(name):
                    found.setdefault(m.group(1), [{} for _ in rule.source_patterns])[j][int(m.group(2))] = stored
        for prefix, per in found.items():
            target = prefix + rule.target_patterns[0]
            n = len(per[0])
            if target in wanted and n and all(sorted(d) == list(range(n)) for d in per):
                out[target] = ([[d[i] for i in range(n)] for d in per], ops[0].dim, ops[1].dim if len(ops) == 2 else None)
    return out


def _pack(prefix: str, inputs: list) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{j}": h for j, (h, _) in enumerate(inputs)}


def _unpack(prefix: str, saved: dict, inputs: list) -> list:
    return [(saved[f"{prefix}.{j}"], kw) for j, (_, kw) in enumerate(inputs)]


class StreamingBackend:
    """把 HF 目录 ``source`` 流式转换到 ``out``（见模块说明）。"""

    limits = LIMITS

    def __init__(self, source: Path, out: Path, resume: bool = False, source_name: str | None = None):
        self.folder, self.out, self.resume = Path(source), Path(out), resume
        self.source_name = source_name or str(source)
        self.marks, self.device = {}, _device()

    def open(self, recipe: Recipe, stages) -> None:
        """The model as a skeleton on the meta device (no memory for its parameters) and its tokenizer."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder.check_output(self.out, recipe.output.overwrite, keep=(self.folder,))
        trust = recipe.output.trust_remote_code
        with stages("load"):
            self.store = LazyWeights(self.folder)
            self.config = sources.read_config(self.folder, trust)
            self.source_dtype = self.store.dtype()
            with init_empty_weights(include_buffers=False):  # parameters on meta: no memory; rotary tables stay real
                self.model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust)
            self.model.eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.marks["load"] = rss_mib()

    def prepare(self, mm, recipe: Recipe, techs: list, stages) -> None:
        """Every tensor the model needs must be in the files, checked by name before any layer is converted."""
        self.mm, self.layers = mm, self.model.get_submodule(mm.layers_path)
        n, prefix, store = len(self.layers), f"{mm.layers_path}.", self.store
        self.prefix = prefix
        expected = set(self.model.state_dict())
        # plain renames transformers applies on load (GPT-NeoX's embed_out -> lm_head): read under the model's names
        store.rename(loading_renames(self.model, [k for k in store.names() if k not in expected],
                                     expected - set(store.names())))
        # per-expert tensors that transformers stacks on load (Qwen3-MoE): read and stacked one layer at a time
        store.merge(loading_merges(self.model, [k for k in store.names() if k not in expected],
                                   expected - set(store.names())))
        self.layer_keys = [{k[len(f"{prefix}{i}."):] for k in expected if k.startswith(f"{prefix}{i}.")}
                           for i in range(n)]
        self.outer_names = [k for k in store.names() if not k.startswith(prefix) and k in expected]
        lacking = sorted(k for k in expected if k not in store.weight_map and not k.startswith(prefix)
                         and not (k == "lm_head.weight" and self.config.tie_word_embeddings))
        lacking += sorted(f"{prefix}{i}.{k}" for i in range(n) for k in self.layer_keys[i]
                          if f"{prefix}{i}.{k}" not in store.weight_map)
        extra = [k for k in store.names() if k not in expected and not sources.extra_layer(k, self.config)]
        if lacking and extra:  # both sides: names that transformers renames or fuses when it loads this family
            raise SourceError(f"{self.folder} 中张量的名字与模型的不一致（模型要 {', '.join(lacking[:2])}，文件里是 "
                              f"{', '.join(extra[:2])}）：这个家族的检查点在 transformers 加载时要改名或合并张量，流式转换"
                              "按文件中的名字逐层读取，不做这一步。请用 --streaming off（整个模型须放得进内存）")
        sources.check_complete(self.folder, lacking, extra, self.config)
        shapes = self.model.state_dict()
        wrong = [f"{k} {store.shape(k)}≠{list(shapes[k].shape)}" for k in store.names()
                 if k in shapes and store.shape(k) != list(shapes[k].shape)]
        if wrong:
            raise SourceError(f"{self.folder} 中张量的形状与 config.json 不符：{', '.join(wrong[:3])}"
                              f"{' 等 ' + str(len(wrong)) + ' 个' if len(wrong) > 3 else ''}（文件来自别的模型？）")

    def measure_base(self, mm, recipe: Recipe, eval_ids, spans, stages) -> dict:
        """Parameters before any layer is replaced; the base's logits and cache are measured layer by layer."""
        self.spans = spans
        return {"eval": None, "kv": None, "params": parameter_count(self.model),
                "active": active_parameters(self.model, mm)}

    def analyser(self, mm, recipe: Recipe, job, calib_ids, progress):
        return None  # LIMITS: every plan is per layer

    def _open_outer(self, recipe: Recipe, calib_ids, eval_ids, stages, total: int) -> list:
        """The tensors outside the layers, as stored, into the output; each window's input to layer 0.

        A 128k vocabulary makes the embedding and the head 2 GiB each in float32: the embedding is in memory only
        until layer 0's inputs are captured, the head only for the final logits."""
        model, store, n = self.model, self.store, len(self.layers)
        emb_name = _weight_name(model, model.get_input_embeddings())
        head_name = _weight_name(model, model.get_output_embeddings())
        self.head_name = head_name if head_name in store.weight_map else emb_name  # tied: the head is the embedding
        with stages("outer"):
            if not (self.run.dir / shard_name(n, total)).exists():
                store.copy_to(self.outer_names, self.run.dir / shard_name(n, total))
            small = [k for k in self.outer_names if k not in (emb_name, self.head_name)]
            model.load_state_dict(store.read(small + [emb_name], COMPUTE_DTYPE), strict=False, assign=True)
            calib = capture_layer_inputs(model, self.layers, calib_ids, recipe.calibration.batch_size)
            self.evals = capture_layer_inputs(model, self.layers, eval_ids, 1) if recipe.eval.enabled else []
            self.prompt = capture_layer_inputs(model, self.layers, eval_ids[:1, :PROMPT_TOKENS], 1)
            _release(model.get_input_embeddings())
        self.marks["outer"] = rss_mib()
        return calib  # the layer loop replaces it layer by layer: not kept here, or layer 0's inputs stay in memory

    def convert_layers(self, work, calib_ids, eval_ids, progress, stages) -> None:
        """Layer i: the base's evaluation windows through the source layer; statistics; conversion; calibration and
        evaluation windows through the converted layer; its shard written and released; the state committed."""
        recipe, n, prefix = work.recipe, len(self.layers), self.prefix
        self.heads = recipe.mtp.heads if recipe.mtp.enabled else 0
        self.total = total = n + 1 + (1 if self.heads else 0)
        self.run = run = Run(self.out, _fingerprint(self.folder, self.store, recipe), self.resume)
        calib = self._open_outer(recipe, calib_ids, eval_ids, stages, total)
        record = run.saved or {"infos": [], "specs": {t.structure_key: {} for t in work.techs}, "kv_base": [],
                               "kv_patched": [], "balance": [], "layer_seconds": [], "layer_rss_mib": [],
                               "as_tuple": None}
        work.infos = record["infos"]
        work.specs = {key: {int(i): s for i, s in per.items()} for key, per in record["specs"].items()}
        evals, device = self.evals, self.device
        ev_base, ev_patched = list(evals), list(evals)
        if run.done >= 0:
            saved = run.hidden()
            calib = _unpack("calib", saved, calib)
            ev_base, ev_patched = _unpack("base", saved, evals), _unpack("patched", saved, evals)
            del saved
        self.resumed_from = run.done + 1 if run.done >= 0 else None

        names = "+".join(t.section.upper() for t in work.techs) or "MTP"
        progress.start(f"流式转换：{names}", n, completed=run.done + 1)
        for i in range(run.done + 1, n):
            t_layer = time.perf_counter()
            torch.manual_seed(recipe.calibration.seed * 1000 + i)  # a resumed run draws the same numbers
            layer, lm = self.layers[i], self.mm.layers[i]
            with stages("read"):
                progress.step(i, "读入权重")
                tensors = self.store.read([f"{prefix}{i}.{k}" for k in self.layer_keys[i]], COMPUTE_DTYPE)
                layer.load_state_dict({k[len(f"{prefix}{i}."):]: v for k, v in tensors.items()}, strict=True,
                                      assign=True)
                del tensors
            if record["as_tuple"] is None:
                with torch.no_grad():
                    record["as_tuple"] = isinstance(layer(*self.prompt[0][:1], **self.prompt[0][1]), tuple)
            with stages("evaluate_base"):
                progress.step(i, "基座前推（评估窗口）")
                record["kv_base"].append(_cache_elements(layer, self.prompt))
                ev_base = _forward(layer, ev_base, device)
            with stages("calibrate"):
                progress.step(i, "统计校准输入")
                layer.to(device)
                stats = {k: v.cpu() for k, v in collect(layer, work.captures(i), [_to(b, device) for b in calib]).items()}
                layer.to("cpu")
            with stages("convert"):
                work(i, layer, stats, progress)
                del stats
            with stages("propagate"):
                progress.step(i, "转换后前推（校准与评估窗口）")
                record["kv_patched"].append(_cache_elements(layer, self.prompt))
                calib = _forward(layer, calib, device)
                ev_patched = _forward_counting(layer, lm, ev_patched, device, record["balance"], i)
            with stages("write"):
                progress.step(i, "写分片")
                write_shard(run.dir, shard_name(i, total),
                            {f"{prefix}{i}.{k}": v for k, v in layer.state_dict().items()}, self.source_dtype)
                _release(layer)
            record["specs"] = {key: {str(j): s for j, s in per.items()} for key, per in work.specs.items()}
            record["layer_seconds"].append(time.perf_counter() - t_layer)
            record["layer_rss_mib"].append(rss_mib()[0])
            run.commit(i, {**_pack("calib", calib), **_pack("base", ev_base), **_pack("patched", ev_patched)}, record)
            progress.advance()
        self.record, self.ev_base, self.ev_patched, self.eval_ids = record, ev_base, ev_patched, eval_ids
        self.marks["layers"] = rss_mib()

    def finish(self, work, plan: dict, extras: list, calib_ids, progress, stages) -> nn.Module:
        """Logits from the stored final hidden states (the skeleton's own norm and head); then the output model's
        skeleton, the MTP modules from the converted source layer's shard, the index, config, code and tokenizer."""
        model, mm, record, recipe = self.model, self.mm, self.record, work.recipe
        self.fidelity = None
        head = model.get_output_embeddings()
        with stages("verify"), _Stack(model, mm.layers_path, record["as_tuple"]) as stack:
            head.weight = nn.Parameter(self.store.read([self.head_name], COMPUTE_DTYPE)[self.head_name],
                                       requires_grad=False)
            if self.evals:
                base = evaluate_base(None, self.eval_ids, logits=stack.logits(self.ev_base), spans=self.spans)
                self.fidelity = compare(None, base, logits=stack.logits(self.ev_patched))
                del base
            norm_path = final_norm_path(model) if self.heads else None
            _release(head)
        self.marks["verify"] = rss_mib()

        self.mtp_record = None
        if self.heads:
            tech = next(t for t in extras if t.section == "mtp")
            self.mtp_record = tech.record(mm, recipe.mtp, self.config.vocab_size, norm_path)
            plan["mtp"] = self.mtp_record
        from accelerate import init_empty_weights

        final_config, model_cls = dsopt_config(self.config, plan)
        with init_empty_weights(include_buffers=False):
            final = model_cls(final_config)
        final.eval()
        with stages("mtp"):
            if self.heads:
                _write_mtp(final, model, self.run, self.mtp_record, calib_ids, shard_name(len(self.layers) + 1, self.total),
                           self.source_dtype, self.prefix, self.total)
        self.marks["mtp"] = rss_mib()

        run = self.run
        with stages("save"):
            weight_map = write_index(run.dir)
            tied = {"lm_head.weight"} if self.config.tie_word_embeddings and "lm_head.weight" not in weight_map else set()
            want = set(final.state_dict()) - tied
            if set(weight_map) != want:
                missing, extra = sorted(want - set(weight_map)), sorted(set(weight_map) - want)
                raise RuntimeError(f"写出的张量与模型结构不符：缺 {missing[:4]}，多 {extra[:4]}")
            with disk_guard(f"写 {run.dir} 失败；已完成的层保留在那里，腾出空间后加 --resume 续做"):
                final_config.save_pretrained(run.dir)
                folder.add_dsopt_code(run.dir, final_config.model_type)
                self.tokenizer.save_pretrained(run.dir)
            if (self.folder / "generation_config.json").exists():
                shutil.copyfile(self.folder / "generation_config.json", run.dir / "generation_config.json")
            (run.dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        self.marks["save"] = rss_mib()
        return final

    def verify(self, work, base: dict, eval_ids, extras: list, progress, stages) -> dict:
        """What the layer loop and ``finish`` measured, as report sections."""
        record = self.record
        itemsize = torch.empty(0, dtype=self.source_dtype).element_size()
        kv_base, kv_patched = sum(record["kv_base"]) * itemsize, sum(record["kv_patched"]) * itemsize
        kv_cache = {"base": {"kv_bytes_per_token": kv_base}, "patched": {"kv_bytes_per_token": kv_patched},
                    "ratio": kv_patched / kv_base,
                    "measured_with": f"每层写入真实 DynamicCache 的元素数（{PROMPT_TOKENS} 个 token 的提示），"
                                     f"按检查点 dtype（{itemsize} 字节）计"}
        sections = {}
        if record["balance"]:
            sections["moe"] = {"balance": record["balance"], "balance_text": "eval windows (held-out)"}
        if self.mtp_record:
            sections["mtp"] = {**self.mtp_record, "note": "流式转换不在整模型上测 MTP 接受率与速度（模型放不进内存预算）；"
                                                          "用 dsopt train-mtp 训练后再测"}
        return {"fidelity": self.fidelity, "kv_cache": kv_cache, "sections": sections}

    def save(self, report: dict, recipe: Recipe, notes: list, stages, eval_ids) -> None:
        report["streaming"] = {"notes": notes, "compute_dtype": str(COMPUTE_DTYPE).replace("torch.", ""),
                               "checkpoint_dtype": str(self.source_dtype).replace("torch.", ""),
                               "device": str(self.device), "resumed_from_layer": self.resumed_from,
                               "source_weight_bytes": self.store.nbytes()}
        report["resources"].update(
            peak_rss_mib=rss_mib()[1], stage_seconds=stages.seconds,
            rss_mib_after_stage={k: {"current": c, "peak": p} for k, (c, p) in self.marks.items()},
            layer_seconds=self.record["layer_seconds"], layer_rss_mib=self.record["layer_rss_mib"])
        write_report(self.run.dir, report)
        (self.run.dir / "README.md").write_text(folder.model_card(report), encoding="utf-8")
        self.run.finish(recipe.output.overwrite, self.folder)


def _forward_counting(layer: nn.Module, lm, inputs: list, device, balance: list, i: int) -> list:
    """``_forward``, recording the converted MoE layer's expert load on these (held-out) windows."""
    mlp = layer.get_submodule(lm.mlp) if lm.mlp else None
    if not isinstance(mlp, MoEMLP) or not inputs:
        return _forward(layer, inputs, device)
    counts = torch.zeros(mlp.num_experts)

    def hook(m, _inp, _out):
        counts.add_(routing_counts(m).cpu())

    handle = mlp.register_forward_hook(hook)
    try:
        out = _forward(layer, inputs, device)
    finally:
        handle.remove()
    balance.append(balance_record(i, counts))
    return out


def _write_mtp(final: nn.Module, model: nn.Module, run: Run, rec: dict, calib_ids, name: str, dtype, prefix: str,
               total: int) -> None:
    """MTP modules: the block from the converted source layer (read back from its shard), the final norm, [I, I]."""
    src = rec["source_layer"]
    block = read_shard(run.dir / shard_name(src, total), COMPUTE_DTYPE)
    block = {k[len(f"{prefix}{src}."):]: v for k, v in block.items()}
    norm = {k: v.detach().clone() for k, v in model.get_submodule(rec["norm_path"]).state_dict().items()}
    final.mtp.to_empty(device="cpu")
    with torch.no_grad():
        for mod in final.mtp:
            mod.block.load_state_dict(block, strict=True)
            mod.norm.load_state_dict(norm, strict=True)
            mod.hnorm.weight.fill_(1.0)
            mod.enorm.weight.fill_(1.0)
    init_eh_proj(final.mtp, final.config.hidden_size)
    choose_draft_vocab(final, calib_ids)
    write_shard(run.dir, name, {f"mtp.{k}": v for k, v in final.mtp.state_dict().items()}, dtype)
    _release(final.mtp)
