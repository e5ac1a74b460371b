"""流式转换：大模型一层一层地读入、校准、转换、写出，内存约为一层加激活；中断后 ``--resume`` 接着做。

与 ``api.patch_model`` 是同一条管线、同一批转换器，区别只在模型从哪里来、到哪里去：

1. 模型骨架建在 meta 设备上（参数不占内存），定位器在骨架上追踪；层外的张量（嵌入、末层归一化、输出头）
   读进内存，解码层的权重用到时才从 safetensors 读入（以 float32 计算：CPU 上 bf16 矩阵乘法慢得多）；
2. 第 i 层：评估窗口先经过*源*层（基座）；收集校准统计；转换器就地替换模块；校准与评估窗口再经过*转换后*
   的层；该层按源 dtype 写成一个分片，然后释放；
3. 每层完成后，下一层的输入（校准与评估的隐藏状态）和已完成层的记录原子地存进工作目录 ``.OUT.partial/``；
   ``--resume`` 从最后完成的层接着做，写出的权重字节与一次跑完的相同（测试里真的杀掉进程来验证）；
4. 最后用末层归一化和输出头把两路隐藏状态变成 log 概率：保真度指标与内存中的管线完全相同；MTP 模块由
   转换后的层（从它的分片读回）和末层归一化组成；索引从磁盘上的分片生成，与模型结构核对后整个目录改名。

需要先看完所有层的全局规划（敏感度探测、按谱分配秩、解耦 RoPE 的频率选择、MTP 训练）流式模式不做：
缺省的 sensitivity 分配改为 uniform 并写进报告，显式要求这些功能时报错。
有 GPU 时，层的前向（校准、评估）在 GPU 上逐层执行；分解（SVD）在 CPU 上以 float64 做。
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import converters
from converters.mla import PlanError
from converters.mtp import final_norm_path

from . import __version__, checkpoint
from .calibrate import _call, capture_layer_inputs, collect, recipe_windows
from .checkpoint import OutputError, SourceError
from .fidelity import compare, evaluate_base, parameter_count, write_report
from .locate import locate
from .recipe import Recipe, RecipeError
from .shards import LazyWeights, read_shard, shard_name, write_index, write_shard

COMPUTE_DTYPE = torch.float32
AUTO_BYTES = 2 * 1024 ** 3  # --streaming auto: sources whose weights exceed this are streamed
STATE_DIR = "stream-state"
PROMPT_TOKENS = 64  # the prompt the per-layer cache measurement writes


def wanted(src_bytes: int, recipe: Recipe) -> bool:
    mode = recipe.output.streaming
    return mode == "on" or (mode == "auto" and src_bytes > AUTO_BYTES)


def streaming_recipe(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe as a per-layer plan can honour it; returns it and what changed. Explicit global asks are errors."""
    def refuse(what: str):
        raise RecipeError(f"流式转换逐层规划，不能{what}；请去掉该选项，或用 --streaming off（整个模型须放得进内存）")

    notes, mla, moe = [], recipe.mla, recipe.moe
    if recipe.output.format != "dsopt":
        refuse("导出 DeepSeek-V3 格式（解耦 RoPE 的频率要看完所有层才能选）")
    if mla.enabled and mla.rope != "latent":
        refuse("做解耦 RoPE（频率要看完所有层才能选）")
    if recipe.mtp.train_tokens:
        refuse("在转换时训练 MTP（之后用 dsopt train-mtp）")
    if mla.enabled and mla.kv_lora_rank is None and mla.allocation != "uniform":
        if "allocation" in mla.model_fields_set:
            refuse(f"按 {mla.allocation} 在层间分配秩（要先看完所有层）")
        mla = mla.model_copy(update={"allocation": "uniform"})
        notes.append("mla.allocation: sensitivity → uniform（流式转换逐层规划，不做全模型敏感度探测）")
    if moe.enabled and moe.mode == "split" and moe.allocation != "uniform":
        if "allocation" in moe.model_fields_set:
            refuse(f"按 {moe.allocation} 在层间分配激活比例（要先看完所有层）")
        moe = moe.model_copy(update={"allocation": "uniform"})
        notes.append("moe.allocation: sensitivity → uniform（流式转换逐层规划，不做全模型敏感度探测）")
    return recipe.model_copy(update={"mla": mla, "moe": moe}), notes


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
        out = [(_call(layer, _to(h, device), _to(kw, device)).cpu(), kw) for h, kw in inputs]
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
    name = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"  # v5 renamed it
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
        if os.environ.get("DSOPT_TEST_KILL_AFTER_LAYER") == str(i):  # tests: a real kill at a known point
            os.kill(os.getpid(), 9)

    def finish(self, overwrite: bool) -> None:
        shutil.rmtree(self.state)
        checkpoint.check_output(self.out, overwrite)
        checkpoint.replace_dir(self.dir, self.out)


def _fingerprint(folder: Path, store: LazyWeights, recipe: Recipe) -> dict:
    files = sorted(set(store.weight_map.values()))
    return {"dsopt_version": __version__, "source": str(Path(folder).resolve()),
            "weights": [[f, (Path(folder) / f).stat().st_size, (Path(folder) / f).stat().st_mtime_ns] for f in files],
            "recipe": recipe.model_dump(mode="json", exclude={"output": {"overwrite", "streaming"}})}


def _pack(prefix: str, inputs: list) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{j}": h for j, (h, _) in enumerate(inputs)}


def _unpack(prefix: str, saved: dict, inputs: list) -> list:
    return [(saved[f"{prefix}.{j}"], kw) for j, (_, kw) in enumerate(inputs)]


def convert_streaming(folder: Path, recipe: Recipe, out: Path, progress, resume: bool = False,
                      source_name: str | None = None) -> dict:
    """把 HF 目录 ``folder`` 流式转换到 ``out``（见模块说明）；返回报告。"""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .api import Context, Stages, active_parameters, dsopt_config, structure_plan

    t_start = time.perf_counter()
    stages, marks = Stages(), {}
    recipe, notes = streaming_recipe(recipe)
    if not recipe.techniques():
        raise RecipeError("配方没有启用任何技术：至少给出 --mla、--moe 或 --mtp（或在配方中启用一节）")
    out, folder = Path(out), Path(folder)
    checkpoint.check_output(out, recipe.output.overwrite)
    trust = recipe.output.trust_remote_code
    device = _device()

    with stages("load"):
        store = LazyWeights(folder)
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        except ValueError as e:
            raise SourceError(f"{folder}/config.json 无法解析或需要远程代码（--trust-remote-code）：{e}") from None
        source_dtype = store.dtype()
        with init_empty_weights(include_buffers=False):  # parameters on meta: no memory; rotary tables stay real
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    marks["load"] = _rss_mib()

    with stages("locate"):
        mm = locate(model)
    layers = model.get_submodule(mm.layers_path)
    n = len(layers)
    convs = converters.enabled_converters(recipe)
    for lm in mm.layers:
        for conv in convs:
            conv.check(lm, recipe)
    plans = {c.section: c.plan(mm, recipe, [None] * n) for c in convs}  # per-layer plans: no analysis pass
    calib_ids, eval_ids, provenance = recipe_windows(tokenizer, recipe)
    ctx = Context(model, mm)
    base_params, base_active = parameter_count(model), active_parameters(model, mm)  # before any layer is replaced

    prefix = f"{mm.layers_path}."
    expected = set(model.state_dict())
    layer_keys = [{k[len(f"{prefix}{i}."):] for k in expected if k.startswith(f"{prefix}{i}.")} for i in range(n)]
    outer_names = [k for k in store.names() if not k.startswith(prefix) and k in expected]
    lacking = sorted(k for k in expected if k not in store.weight_map and not k.startswith(prefix)
                     and not (k == "lm_head.weight" and config.tie_word_embeddings))
    lacking += sorted(f"{prefix}{i}.{k}" for i in range(n) for k in layer_keys[i] if f"{prefix}{i}.{k}" not in store.weight_map)
    if lacking:
        raise SourceError(f"检查点缺少模型需要的张量（按模块名读取）：{', '.join(lacking[:4])}"
                          f"{' 等 ' + str(len(lacking)) + ' 个' if len(lacking) > 4 else ''}")

    heads = recipe.mtp.heads if recipe.mtp.enabled else 0
    src = recipe.mtp.init_layer if recipe.mtp.init_layer >= 0 else n + recipe.mtp.init_layer
    if heads and not 0 <= src < n:  # checked before any layer is converted, not after all of them
        raise PlanError(f"--mtp-init-layer {recipe.mtp.init_layer} 超出范围：模型只有 {n} 层")
    run = Run(out, _fingerprint(folder, store, recipe), resume)
    total = n + 1 + (1 if heads else 0)

    # A 128k vocabulary makes the embedding and the head 2 GiB each in float32: the embedding is in memory only
    # until layer 0's inputs are captured, the head only for the final logits.
    emb_name = _weight_name(model, model.get_input_embeddings())
    head_name = _weight_name(model, model.get_output_embeddings())
    head_name = head_name if head_name in store.weight_map else emb_name  # tied: the head is the embedding
    with stages("outer"):
        if not (run.dir / shard_name(n, total)).exists():  # the outer tensors as stored, for the output
            store.copy_to(outer_names, run.dir / shard_name(n, total))
        small = [k for k in outer_names if k not in (emb_name, head_name)]
        model.load_state_dict(store.read(small + [emb_name], COMPUTE_DTYPE), strict=False, assign=True)
        calib = capture_layer_inputs(model, layers, calib_ids, recipe.calibration.batch_size)
        evals = capture_layer_inputs(model, layers, eval_ids, 1) if recipe.eval.enabled else []
        prompt = capture_layer_inputs(model, layers, eval_ids[:1, :PROMPT_TOKENS], 1)
        _release(model.get_input_embeddings())
    marks["outer"] = _rss_mib()

    record = run.saved or {"infos": [], "specs": {c.structure_key: {} for c in convs}, "kv_base": [],
                           "kv_patched": [], "balance": [], "layer_seconds": [], "layer_rss_mib": [],
                           "as_tuple": None}
    ev_base, ev_patched = list(evals), list(evals)
    if run.done >= 0:
        saved = run.hidden()
        calib = _unpack("calib", saved, calib)
        ev_base, ev_patched = _unpack("base", saved, evals), _unpack("patched", saved, evals)
        del saved
    resumed_from = run.done + 1 if run.done >= 0 else None

    names = "+".join(c.section.upper() for c in convs) or "MTP"
    progress.start(f"流式转换：{names}", n, completed=run.done + 1)
    for i in range(run.done + 1, n):
        t_layer = time.perf_counter()
        torch.manual_seed(recipe.calibration.seed * 1000 + i)  # a resumed run draws the same numbers
        layer, lm = layers[i], mm.layers[i]
        with stages("read"):
            progress.step(i, "读入权重")
            tensors = store.read([f"{prefix}{i}.{k}" for k in layer_keys[i]], COMPUTE_DTYPE)
            layer.load_state_dict({k[len(f"{prefix}{i}."):]: v for k, v in tensors.items()}, strict=True, assign=True)
            del tensors
        if record["as_tuple"] is None:
            with torch.no_grad():
                record["as_tuple"] = isinstance(layer(*prompt[0][:1], **prompt[0][1]), tuple)
        with stages("evaluate_base"):
            progress.step(i, "基座前推（评估窗口）")
            record["kv_base"].append(_cache_elements(layer, prompt))
            ev_base = _forward(layer, ev_base, device)
        with stages("calibrate"):
            progress.step(i, "统计校准输入")
            layer.to(device)
            stats = {k: v.cpu() for k, v in collect(layer, [w for c in convs for w in c.captures(lm, recipe)],
                                                   [_to(b, device) for b in calib]).items()}
            layer.to("cpu")
        with stages("convert"):
            info = {"layer": i}
            for conv in convs:
                progress.step(i, f"转换 {conv.section.upper()}")
                spec, extra = conv.convert(ctx, layer, lm, stats, plans[conv.section][i], recipe)
                if spec is not None:
                    record["specs"][conv.structure_key][str(i)] = spec
                info.update(extra)
            del stats
        with stages("propagate"):
            progress.step(i, "转换后前推（校准与评估窗口）")
            record["kv_patched"].append(_cache_elements(layer, prompt))
            calib = _forward(layer, calib, device)
            ev_patched = _forward_counting(layer, lm, ev_patched, device, record["balance"], i)
        with stages("write"):
            progress.step(i, "写分片")
            write_shard(run.dir, shard_name(i, total), {f"{prefix}{i}.{k}": v for k, v in layer.state_dict().items()},
                        source_dtype)
            _release(layer)
        record["infos"].append(info)
        record["layer_seconds"].append(time.perf_counter() - t_layer)
        record["layer_rss_mib"].append(_rss_mib()[0])
        run.commit(i, {**_pack("calib", calib), **_pack("base", ev_base), **_pack("patched", ev_patched)}, record)
        progress.advance()
    marks["layers"] = _rss_mib()

    fidelity = None
    head = model.get_output_embeddings()
    with stages("verify"), _Stack(model, mm.layers_path, record["as_tuple"]) as stack:
        head.weight = nn.Parameter(store.read([head_name], COMPUTE_DTYPE)[head_name], requires_grad=False)
        if evals:
            base = evaluate_base(None, eval_ids, logits=stack.logits(ev_base))
            fidelity = compare(None, base, logits=stack.logits(ev_patched))
            del base
        norm_path = final_norm_path(model) if heads else None
        _release(head)
    marks["verify"] = _rss_mib()

    specs = {key: {int(i): s for i, s in per.items()} for key, per in record["specs"].items()}
    plan = structure_plan(mm, specs)
    mtp_record = None
    if heads:
        vocab = config.vocab_size
        mtp_record = {"heads": heads, "source_layer": src, "norm_path": norm_path,
                      "draft_vocab": recipe.mtp.draft_vocab if 0 < recipe.mtp.draft_vocab < vocab else 0}
        plan["mtp"] = mtp_record
    final_config, model_cls = dsopt_config(config, plan)
    with init_empty_weights(include_buffers=False):
        final = model_cls(final_config)
    final.eval()

    with stages("mtp"):
        if heads:
            _write_mtp(final, model, mm, run, store, mtp_record, calib_ids, shard_name(n + 1, total), source_dtype,
                       prefix, total)
    marks["mtp"] = _rss_mib()

    with stages("save"):
        weight_map = write_index(run.dir)
        tied = {"lm_head.weight"} if config.tie_word_embeddings and "lm_head.weight" not in weight_map else set()
        want = set(final.state_dict()) - tied
        if set(weight_map) != want:
            missing, extra = sorted(want - set(weight_map)), sorted(set(weight_map) - want)
            raise RuntimeError(f"写出的张量与模型结构不符：缺 {missing[:4]}，多 {extra[:4]}")
        final_config.save_pretrained(run.dir)
        checkpoint.add_dsopt_code(run.dir, type(final_config).__name__, model_cls.__name__)
        tokenizer.save_pretrained(run.dir)
        if (folder / "generation_config.json").exists():
            shutil.copyfile(folder / "generation_config.json", run.dir / "generation_config.json")
        (run.dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    marks["save"] = _rss_mib()

    itemsize = torch.empty(0, dtype=source_dtype).element_size()
    kv_base, kv_patched = sum(record["kv_base"]) * itemsize, sum(record["kv_patched"]) * itemsize
    patched_active = active_parameters(final, mm)
    report = {
        "dsopt_version": __version__,
        "source": source_name or str(folder),
        "model_type": mm.model_type,
        "techniques": recipe.techniques(),
        "recipe_name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "fidelity": fidelity,
        "kv_cache": {"base": {"kv_bytes_per_token": kv_base}, "patched": {"kv_bytes_per_token": kv_patched},
                     "ratio": kv_patched / kv_base,
                     "measured_with": f"每层写入真实 DynamicCache 的元素数（{PROMPT_TOKENS} 个 token 的提示），"
                                      f"按检查点 dtype（{itemsize} 字节）计"},
        "parameters": {"base": base_params, "patched": parameter_count(final),
                       "base_active_per_token": base_active, "patched_active_per_token": patched_active,
                       "active_ffn_fraction_vs_dense": patched_active["ffn_active"] / max(base_active["ffn_total"], 1)},
        "plan": {c.section: c.summary(mm, recipe, plans[c.section], specs[c.structure_key]) for c in convs},
        "layers": record["infos"],
        **({"moe": {"balance": record["balance"], "balance_text": "eval windows (held-out)"}} if record["balance"] else {}),
        **({"mtp": {**mtp_record, "note": "流式转换不在整模型上测 MTP 接受率与速度（模型放不进内存预算）；"
                                          "用 dsopt train-mtp 训练后再测"}} if mtp_record else {}),
        **provenance,
        "streaming": {"notes": notes, "compute_dtype": str(COMPUTE_DTYPE).replace("torch.", ""),
                      "checkpoint_dtype": str(source_dtype).replace("torch.", ""), "device": str(device),
                      "resumed_from_layer": resumed_from, "source_weight_bytes": store.nbytes()},
        "resources": {"conversion_seconds": time.perf_counter() - t_start, "peak_rss_mib": _rss_mib()[1],
                      "stage_seconds": stages.seconds,
                      "rss_mib_after_stage": {k: {"current": c, "peak": p} for k, (c, p) in marks.items()},
                      "layer_seconds": record["layer_seconds"], "layer_rss_mib": record["layer_rss_mib"]},
    }
    write_report(run.dir, report)
    (run.dir / "README.md").write_text(checkpoint.model_card(report), encoding="utf-8")
    run.finish(recipe.output.overwrite)
    return report


def _forward_counting(layer: nn.Module, lm, inputs: list, device, balance: list, i: int) -> list:
    """``_forward``, recording the converted MoE layer's expert load on these (held-out) windows."""
    from converters.moe import balance_record, routing_counts
    from .modeling import MoEMLP

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


def _write_mtp(final: nn.Module, model: nn.Module, mm, run: Run, store: LazyWeights, rec: dict, calib_ids,
               name: str, dtype, prefix: str, total: int) -> None:
    """MTP modules: the block from the converted source layer (read back from its shard), the final norm, [I, I]."""
    from .mtp import choose_draft_vocab

    src = rec["source_layer"]
    block = read_shard(run.dir / shard_name(src, total), COMPUTE_DTYPE)
    block = {k[len(f"{prefix}{src}."):]: v for k, v in block.items()}
    norm = {k: v.detach().clone() for k, v in model.get_submodule(rec["norm_path"]).state_dict().items()}
    d = final.config.hidden_size
    final.mtp.to_empty(device="cpu")
    with torch.no_grad():
        for mod in final.mtp:
            mod.block.load_state_dict(block, strict=True)
            mod.norm.load_state_dict(norm, strict=True)
            mod.hnorm.weight.fill_(1.0)
            mod.enorm.weight.fill_(1.0)
            eye = torch.eye(d, dtype=mod.eh_proj.weight.dtype)
            mod.eh_proj.weight.copy_(torch.cat([eye, eye], 1))
    choose_draft_vocab(final, calib_ids)
    write_shard(run.dir, name, {f"mtp.{k}": v for k, v in final.mtp.state_dict().items()}, dtype)
    _release(final.mtp)
