"""Coverage sweep: which transformers architectures milpasses puts on the Neural Engine.

For every model type in transformers' ``MODEL_MAPPING_NAMES`` it builds a tiny seeded model
offline (hidden 32, 2 layers, 4 heads, vocab 100, eager attention), traces it on a padded batch,
converts it in fp16 with coremltools' DEFAULT pipeline and with ``ane_pipeline()``, simulates
both and compares them with torch. Then it writes ``docs/coverage.md`` (the table users read)
and ``docs/coverage.json`` (the same records, for tools).

    nice -n 19 python benchmarks/coverage.py                      # every architecture, writes docs/
    python benchmarks/coverage.py --only bert,llama,mixtral       # a few, printed, docs untouched
    python benchmarks/coverage.py --only bert --out /tmp/cov      # a few, written to /tmp/cov

Each architecture runs in a worker process with a time limit (``--timeout``, 120 s), so a crash
or a hang is recorded and the sweep goes on. Workers import torch and coremltools once and are
replaced every ``RECYCLE`` architectures, so memory does not pile up. It runs outside CI; it
prints its wall time.

How the tiny model is built, with no per-family code: the config class's own defaults, with the
size fields below set through the config's ``attribute_map`` (so ``hidden_size`` reaches
``d_model`` or ``n_embd``) wherever the default config has that field; sub-configs (a composite
model's text and vision parts) shrunk the same way; special token ids moved inside the
vocabulary. Encoder-decoder models are swept as their encoder: the standalone ``...EncoderModel``
class when transformers has one, else ``model.get_encoder()``. Parameters are then perturbed
like ``fixtures/families.py`` does (HF's init leaves norms at 1 and biases at 0).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # on sys.path for fixtures.families, imported lazily
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, SEQ_LEN, VALID_TOKENS = 2, 8, 5  # the second row keeps VALID_TOKENS tokens, the rest is padding
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, VOCAB = 32, 4, 2, 2, 64, 100
IMAGE, PATCH = 32, 8
SEED = 0
WEIGHT_STD = 0.2
TIMEOUT = 120.0  # seconds per architecture
RECYCLE = 20  # architectures per worker before it is replaced
#: A "tiny" model whose config kept sizes this sweep cannot reach through the generic fields
#: would take minutes; it is reported as not built rather than converted slowly.
MAX_PARAMETERS = 3_000_000
FP16_PSNR_BAR = 60.0
CHECKPOINT_EVERY = 10  # architectures between rewrites of the output files (a partial sweep is kept)

#: Size fields, by their standard name (translated through each config's attribute_map). Set
#: only where the default config has the field with a non-None value (None means "derived").
SIZES = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "intermediate_size": FFN, "vocab_size": VOCAB,
    "head_dim": HIDDEN // HEADS, "max_position_embeddings": 128, "image_size": IMAGE, "patch_size": PATCH,
    # the same sizes under the other names families give them
    "embedding_size": HIDDEN, "d_kv": HIDDEN // HEADS, "kv_channels": HIDDEN // HEADS,
    "ffn_dim": FFN, "encoder_ffn_dim": FFN, "decoder_ffn_dim": FFN, "d_ff": FFN, "n_inner": FFN,
    "encoder_layers": LAYERS, "decoder_layers": LAYERS, "num_layers": LAYERS, "num_decoder_layers": LAYERS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "num_heads": HEADS,
    "projection_dim": HIDDEN, "global_head_dim": HIDDEN // HEADS, "embed_dim": HIDDEN,
    "rotary_dim": HIDDEN // HEADS // 2,  # partial rotary (GPT-J, CodeGen): half of each head rotated
    "window_size": 4,  # windowed vision attention (Swin): the 4x4 patch grid is one window
    # mixture of experts: few small experts, and the dense-first layers kept to one
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": FFN // 2, "shared_expert_intermediate_size": FFN // 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # multi-head latent attention (DeepSeek-V2/V3)
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
}
#: List-valued sizes of hierarchical (vision) configs: one block per stage, small widths.
LIST_SIZES = {
    "depths": lambda n: [1] * n,
    "hidden_sizes": lambda n: [16 * 2 ** i for i in range(n)],
    "num_heads": lambda n: [1] * n,
}

#: Per-architecture overrides, each for a reason a generic build cannot know. Empty so far.
OVERRIDES: dict[str, dict] = {}

LAYOUT_OPS = ("transpose", "reshape", "expand_dims", "squeeze")


class StageError(Exception):
    """A failure at a named stage of one architecture's sweep."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


# ----------------------------------------------------------------------------------------------
# Building a tiny model of one architecture


def _config_kwargs(config_class, default) -> dict:
    """Constructor keyword arguments that shrink ``default`` (an instance of ``config_class``)."""
    attribute_map = getattr(config_class, "attribute_map", {}) or {}
    kwargs = {}
    for name, value in SIZES.items():
        own = attribute_map.get(name, name)
        if _read_only(config_class, own):
            continue  # derived from the other fields (Falcon's head_dim)
        current = getattr(default, own, None)
        if isinstance(current, int) and not isinstance(current, bool):
            kwargs[own] = value
    for name, make in LIST_SIZES.items():
        current = getattr(default, name, None)
        if isinstance(current, (list, tuple)) and current and all(isinstance(v, int) for v in current):
            kwargs[name] = make(len(current))
    if "hidden_sizes" in kwargs and kwargs.get("hidden_size") and \
            getattr(default, "hidden_size", None) == list(default.hidden_sizes)[-1]:
        kwargs["hidden_size"] = kwargs["hidden_sizes"][-1]  # hidden_size is the last stage's width
    if "depths" in kwargs:  # hierarchical vision: stages come from the lists, each halves the patch grid
        kwargs.pop(attribute_map.get("num_hidden_layers", "num_hidden_layers"), None)
        kwargs.pop(attribute_map.get("patch_size", "patch_size"), None)
    if "qk_rope_head_dim" in kwargs:  # latent attention: head_dim is the rotary part; K/V heads are per query head
        if getattr(default, "head_dim", None) == default.qk_rope_head_dim:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = HEADS
    kwargs.update(_token_ids(default, kwargs.get(attribute_map.get("vocab_size", "vocab_size"), VOCAB)))
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        sub_default = getattr(default, name, None)
        if sub_default is None or not hasattr(sub_default, "to_dict"):
            continue
        sub_kwargs = _config_kwargs(type(sub_default), sub_default)
        sub_kwargs["model_type"] = sub_default.model_type
        kwargs[name] = sub_kwargs
    return kwargs


def _read_only(config_class, name: str) -> bool:
    attribute = inspect.getattr_static(config_class, name, None)
    return isinstance(attribute, property) and attribute.fset is None


def _token_ids(default, vocab: int) -> dict:
    """Special token ids (``*_token_id``, ``*_token_index``) that fall outside the tiny vocabulary,
    moved to the lowest free ids inside it."""
    found = {}
    for name in dir(default):
        if not (name.endswith("_token_id") or name.endswith("_token_index") or name.endswith("_token_ids")):
            continue
        try:
            value = getattr(default, name)
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            found[name] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            found[name] = list(value)
    taken = {v for value in found.values() for v in (value if isinstance(value, list) else [value])
             if 0 <= v < vocab}
    free = (i for i in range(vocab) if i not in taken)
    moved = {}
    for name, value in sorted(found.items()):
        if isinstance(value, list):
            if any(v >= vocab for v in value):
                moved[name] = [v if v < vocab else next(free) for v in value]
        elif value >= vocab:
            moved[name] = next(free)
    return moved


def special_token_ids(config) -> set[int]:
    """Every special token id of ``config`` and its sub-configs (kept out of the sampled ids)."""
    ids = set()
    for name in dir(config):
        if name.endswith(("_token_id", "_token_index", "_token_ids")):
            try:
                value = getattr(config, name)
            except Exception:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
    for name in getattr(type(config), "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            ids |= special_token_ids(sub)
    return ids


def build_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    kwargs = _config_kwargs(config_class, config_class())
    kwargs.update(OVERRIDES.get(model_type, {}))
    config = config_class(**kwargs)
    config._attn_implementation = "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return config


def _model_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES[model_type]
    name = name[0] if isinstance(name, (list, tuple)) else name
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise StageError("build", f"transformers has no class {name} here (an optional dependency is missing)")
    return model_class


def build_model(model_type: str):
    """(model, kind, class name): the tiny seeded model whose ``last_hidden_state`` is swept."""
    import torch
    import transformers

    model_class = _model_class(model_type)
    config = build_config(model_type)
    torch.manual_seed(SEED)
    kind = "model"
    if getattr(config, "is_encoder_decoder", False):
        encoder_class = getattr(transformers, model_class.__name__.removesuffix("Model") + "EncoderModel", None)
        if encoder_class is not None:
            model, kind = encoder_class(config), "encoder model"
        else:
            whole = model_class(config)
            if not hasattr(whole, "get_encoder"):
                raise StageError("build", "encoder-decoder without an encoder to sweep")
            model, kind = whole.get_encoder(), "encoder half"
    else:
        model = model_class(config)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise StageError("build", f"config did not shrink to a tiny model ({parameters / 1e6:.1f}M parameters: "
                                  f"its sizes are not under the generic field names)")
    from fixtures.families import perturb_parameters  # the fixtures' perturbation, shared

    perturb_parameters(model, torch.Generator().manual_seed(SEED), WEIGHT_STD)
    return model, config, kind, type(model).__name__


def sample_inputs(model, config) -> dict:
    """Seeded int32/float32 numpy inputs by name, for the model's forward: ``input_ids`` (and
    ``attention_mask`` when it takes one, the second row padded), else ``pixel_values``."""
    import numpy as np

    parameters = inspect.signature(model.forward).parameters
    rng = np.random.default_rng(SEED)
    if "input_ids" in parameters:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", VOCAB) or VOCAB
        allowed = np.array(sorted(set(range(3, vocab)) - special_token_ids(config)))
        ids = rng.choice(allowed, size=(BATCH, SEQ_LEN)).astype(np.int32)
        inputs = {"input_ids": ids}
        if "attention_mask" in parameters:
            mask = np.ones((BATCH, SEQ_LEN), dtype=np.int32)
            mask[-1, VALID_TOKENS:] = 0
            pad = getattr(text, "pad_token_id", None)
            ids[-1, VALID_TOKENS:] = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
            inputs["attention_mask"] = mask
        return inputs
    if "pixel_values" in parameters:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", IMAGE)
        size = size if isinstance(size, int) else IMAGE
        channels = getattr(vision, "num_channels", 3) or 3
        return {"pixel_values": rng.standard_normal((BATCH, channels, size, size)).astype(np.float32)}
    audio = [name for name in ("input_values", "input_features", "input_points") if name in parameters]
    raise StageError("build", f"takes {audio[0]}, not input_ids or pixel_values (not covered by this sweep)"
                     if audio else "takes neither input_ids nor pixel_values")


def _torch_inputs(inputs: dict):
    import numpy as np
    import torch

    return tuple(torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for v in inputs.values())


# ----------------------------------------------------------------------------------------------
# Converting, counting and comparing


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    line = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return f"{type(error).__name__}: {line}"[:300]


def _torch_op_of(error: BaseException) -> str | None:
    """The torch op coremltools' frontend was converting when ``error`` was raised, if any."""
    kind = None
    tb = error.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if node is not None and isinstance(getattr(node, "kind", None), str):
            kind = node.kind
        tb = tb.tb_next
    return kind


def _program_census(mlmodel) -> dict:
    from milpasses.passes.shared.bc1s import layout_census

    function = mlmodel._mil_program.functions["main"]
    ops = [op for op in function.operations if op.op_type != "const"]
    counts = collections.Counter(op.op_type for op in ops)
    attention_softmax = sum(1 for op in ops if op.op_type == "softmax" and op.outputs[0].rank >= 3)
    return {
        "ops": len(ops),
        "softmax": counts["softmax"],
        "attention_softmax": attention_softmax,
        "sdpa": counts["scaled_dot_product_attention"],
        "matmul": counts["matmul"],
        "linear": counts["linear"],
        "conv": counts["conv"],
        "einsum": counts["einsum"],
        "layout_ops": sum(counts[t] for t in LAYOUT_OPS),
        "layout_census": layout_census(function),
    }


def _compare(expected, actual, valid) -> float:
    import numpy as np
    from milpasses.simulator import psnr

    if actual.shape != expected.shape:
        raise StageError("compare", f"output shape {actual.shape} differs from torch's {expected.shape}")
    if valid is not None and expected.ndim >= 2 and expected.shape[:2] == valid.shape:
        expected, actual = expected[valid], actual[valid]
    value = psnr(expected.astype(np.float64), actual.astype(np.float64))
    return round(value, 2) if math.isfinite(value) else value


def sweep_one(model_type: str, fp32: bool = False, progress=None) -> dict:
    """Build, trace, convert (DEFAULT and ane, fp16), simulate and compare one architecture.

    Returns its record; a failure is recorded with its stage and first line, never raised.
    ``progress(stage)`` is called as each stage starts.
    """
    import numpy as np
    import torch

    import milpasses
    from milpasses.simulator import simulate
    from milpasses.convert.coreml import convert_traced
    from milpasses.frontend.tracing import LastHiddenState

    record = {"name": model_type, "class": None, "kind": None, "parameters": None,
              "built": False, "traced": False, "default_converts": False, "ane_converts": False,
              "attention_blocks": None, "attention_rewritten": None, "attention_skipped": None,
              "all_attention_rewritten": None, "rewritten_kinds": {}, "attention_skip_reasons": {},
              "layout_skip_reasons": {}, "default": None, "ane": None,
              "psnr_default": None, "psnr_ane": None, "fp32_relative_error": None,
              "failure": None, "seconds": None}
    started = time.perf_counter()
    stage = "build"

    def enter(name):
        nonlocal stage
        stage = name
        if progress is not None:
            progress(name)

    try:
        enter("build")
        model, config, record["kind"], record["class"] = build_model(model_type)
        record["parameters"] = sum(p.numel() for p in model.parameters())
        inputs = sample_inputs(model, config)
        valid = inputs["attention_mask"].astype(bool) if "attention_mask" in inputs else None
        wrapper = LastHiddenState(model, tuple(inputs)).eval()
        enter("torch forward")
        with torch.no_grad():
            expected = wrapper(*_torch_inputs(inputs))
        if not isinstance(expected, torch.Tensor):
            raise StageError("torch forward", f"last_hidden_state is a {type(expected).__name__}, not a tensor")
        expected = expected.float().numpy()
        record["built"] = True

        enter("trace")
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, _torch_inputs(inputs), check_trace=False)
        record["traced"] = True

        enter("convert DEFAULT")
        default = convert_traced(traced, inputs, "fp16")
        record["default_converts"] = True
        record["default"] = _program_census(default)
        record["attention_blocks"] = record["default"]["attention_softmax"] + record["default"]["sdpa"]

        enter("convert ane")
        pipeline = milpasses.ane_pipeline()
        ane = convert_traced(traced, inputs, "fp16", pipeline)
        record["ane_converts"] = True
        record["ane"] = _program_census(ane)
        reports = pipeline.reports
        attention = reports.get("ane::attention_to_einsum")
        if attention is not None:
            record["rewritten_kinds"] = dict(attention.rewritten)
            record["attention_rewritten"] = attention.sites_rewritten
            record["attention_skipped"] = attention.sites_skipped
            record["attention_skip_reasons"] = dict(attention.skipped)
        layout = reports.get("ane::bc1s_layout")
        if layout is not None:
            record["layout_skip_reasons"] = dict(layout.skipped)
        if record["attention_blocks"]:
            record["all_attention_rewritten"] = (record["attention_rewritten"] or 0) >= record["attention_blocks"]

        enter("simulate DEFAULT")
        record["psnr_default"] = _compare(expected, simulate(default, inputs)["last_hidden_state"], valid)
        enter("simulate ane")
        record["psnr_ane"] = _compare(expected, simulate(ane, inputs)["last_hidden_state"], valid)
        if fp32:
            enter("fp32 ane")
            actual = simulate(convert_traced(traced, inputs, "fp32", milpasses.ane_pipeline()),
                              inputs)["last_hidden_state"]
            mask = valid if valid is not None and expected.shape[:2] == valid.shape else ...
            record["fp32_relative_error"] = float(np.max(np.abs(actual[mask] - expected[mask]))
                                                  / max(np.max(np.abs(expected[mask])), 1e-30))
    except BaseException as error:  # noqa: BLE001  (the sweep records every failure and goes on)
        if isinstance(error, KeyboardInterrupt):
            raise
        failure = {"stage": getattr(error, "stage", stage), "message": _first_line(error)}
        op = _torch_op_of(error)
        if op is not None:
            failure["torch_op"] = op
        missing = _missing_op(str(error))
        if missing is not None:
            failure["missing_op"] = missing
        record["failure"] = failure
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _missing_op(message: str) -> str | None:
    marker = "PyTorch convert function for op '"
    if marker not in message:
        return None
    return message.split(marker, 1)[1].split("'", 1)[0]


# ----------------------------------------------------------------------------------------------
# Running many, each in a worker process with a time limit


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def _worker(connection, fp32: bool) -> None:
    """Runs architectures sent over ``connection`` until it receives None."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # coremltools' progress bars and transformers' warnings
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    import milpasses.pipeline  # noqa: F401

    while True:
        model_type = connection.recv()
        if model_type is None:
            return
        record = sweep_one(model_type, fp32, progress=lambda stage: connection.send(("stage", stage)))
        connection.send(("record", record))


class _Worker:
    def __init__(self, context, fp32: bool):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, fp32), daemon=True)
        self.process.start()
        child.close()
        self.done = 0
        self.task = None

    def give(self, model_type: str) -> None:
        self.task, self.stage, self.started = model_type, "start", time.monotonic()
        self.connection.send(model_type)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _failed(model_type: str, stage: str, message: str, seconds: float) -> dict:
    return {"name": model_type, "built": False, "traced": False, "default_converts": False,
            "ane_converts": False, "failure": {"stage": stage, "message": message}, "seconds": round(seconds, 1)}


def run_sweep(names: list[str], jobs: int = 1, timeout: float = TIMEOUT, fp32: bool = False,
              log=print, on_record=None) -> list[dict]:
    """Records of ``names``, in order, each swept in a worker with ``timeout`` seconds.
    ``on_record(records_so_far)`` is called after each one (a dict by name)."""
    context = multiprocessing.get_context("spawn")
    pending = collections.deque(names)
    records: dict[str, dict] = {}
    workers = [_Worker(context, fp32) for _ in range(min(jobs, len(names)))]
    try:
        for worker in workers:
            if pending:
                worker.give(pending.popleft())
        while any(w.task is not None for w in workers):
            busy = [w for w in workers if w.task is not None]
            for connection in wait([w.connection for w in busy], timeout=1.0):
                worker = next(w for w in busy if w.connection is connection)
                try:
                    kind, payload = connection.recv()
                except (EOFError, OSError):
                    kind, payload = "crash", None
                if kind == "stage":
                    worker.stage = payload
                    continue
                if kind == "record":
                    records[worker.task] = payload
                else:
                    code = worker.process.exitcode
                    records[worker.task] = _failed(worker.task, worker.stage, f"worker crashed (exit code {code})",
                                                   time.monotonic() - worker.started)
                log(_progress_line(len(records), len(names), records[worker.task]))
                if on_record is not None:
                    on_record(records)
                worker.task = None
                worker.done += 1
                if kind != "record" or worker.done >= RECYCLE:
                    index = workers.index(worker)
                    worker.stop(kill=kind != "record")
                    workers[index] = worker = _Worker(context, fp32)
                if pending:
                    worker.give(pending.popleft())
            for index, worker in enumerate(workers):
                if worker.task is not None and time.monotonic() - worker.started > timeout:
                    records[worker.task] = _failed(worker.task, worker.stage, f"timed out after {timeout:.0f} s",
                                                   time.monotonic() - worker.started)
                    log(_progress_line(len(records), len(names), records[worker.task]))
                    if on_record is not None:
                        on_record(records)
                    worker.stop(kill=True)
                    workers[index] = worker = _Worker(context, fp32)
                    if pending:
                        worker.give(pending.popleft())
    finally:
        for worker in workers:
            worker.stop(kill=worker.task is not None)
    return [records[name] for name in names]


def _progress_line(done: int, total: int, record: dict) -> str:
    if record.get("failure"):
        what = f"{record['failure']['stage']}: {record['failure']['message']}"
    else:
        what = (f"attention {record['attention_rewritten']}/{record['attention_blocks']}, "
                f"psnr {record['psnr_default']} / {record['psnr_ane']} dB")
    return f"[{done}/{total}] {record['name']} ({record['seconds']} s) {what}"


# ----------------------------------------------------------------------------------------------
# The report


def totals(records: list[dict]) -> dict:
    converted = [r for r in records if r["default_converts"]]
    with_attention = [r for r in converted if r.get("attention_blocks")]
    all_rewritten = [r for r in with_attention if r.get("all_attention_rewritten")]
    ane_ok = [r for r in records if r["ane_converts"] and r.get("psnr_ane") is not None]
    return {
        "tried": len(records),
        "built": sum(r["built"] for r in records),
        "traced": sum(r["traced"] for r in records),
        "default_converts": len(converted),
        "ane_converts": sum(r["ane_converts"] for r in records),
        "default_converts_with_attention": len(with_attention),
        "every_attention_block_rewritten": len(all_rewritten),
        "every_attention_block_rewritten_percent":
            round(100.0 * len(all_rewritten) / len(with_attention), 1) if with_attention else None,
        "ane_psnr_at_least_60": sum(1 for r in ane_ok if r["psnr_ane"] >= FP16_PSNR_BAR),
    }


def _reason_groups(records: list[dict]) -> dict[str, list]:
    """Reason -> [(architecture, count), ...], for attention left alone, layout left alone, and failures."""
    groups = {"attention": collections.defaultdict(list), "layout": collections.defaultdict(list),
              "failure": collections.defaultdict(list), "missing_op": collections.defaultdict(list)}
    for r in records:
        for reason, count in (r.get("attention_skip_reasons") or {}).items():
            groups["attention"][reason].append((r["name"], count))
        for reason, count in (r.get("layout_skip_reasons") or {}).items():
            groups["layout"][reason].append((r["name"], count))
        failure = r.get("failure")
        if failure:
            message = failure["message"]
            if failure.get("torch_op"):
                message += f" [torch op {failure['torch_op']}]"
            groups["failure"][f"{failure['stage']}: {message}"].append((r["name"], 1))
            if failure.get("missing_op"):
                groups["missing_op"][failure["missing_op"]].append((r["name"], 1))
    return groups


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.{digits}f}")
    return str(value)


def _status(r: dict) -> str:
    if r.get("failure"):
        return f"fails at {r['failure']['stage']}"
    return "ok"


def render_markdown(records: list[dict], meta: dict) -> str:
    t = totals(records)
    lines = [
        "# Coverage: transformers architectures through `ane_pipeline()`",
        "",
        f"Generated by `benchmarks/coverage.py` on {meta['date']} (wall time {meta['wall_seconds'] / 60:.1f} min; "
        f"transformers {meta['transformers']}, torch {meta['torch']}, coremltools {meta['coremltools']}, "
        f"milpasses {meta['milpasses']} at `{meta['commit']}`). Regenerate with "
        "`nice -n 19 python benchmarks/coverage.py`; the same records are in `docs/coverage.json`.",
        "",
    ]
    if not meta.get("complete", True):
        lines += [f"**Partial sweep: {meta['swept']} of {meta['of']} architectures so far** (alphabetical; "
                  "`--resume` continues it). The totals count the architectures swept.", ""]
    lines += [
        "Each architecture of transformers' `MODEL_MAPPING_NAMES` is built tiny from its config class's "
        f"defaults (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, {KV_HEADS} KV heads where the config has them, "
        f"vocab {VOCAB}, eager attention, seeded weights), encoder-decoders as their encoder, and run on a "
        f"padded batch (B={BATCH}, S={SEQ_LEN}, the second row with {VALID_TOKENS} valid tokens) or "
        f"{IMAGE}x{IMAGE} images. Both conversions are fp16; the simulated outputs are compared with torch "
        "(fp32) on the valid tokens.",
        "",
        "## Totals",
        "",
        "| | count |",
        "|---|---|",
        f"| architectures tried | {t['tried']} |",
        f"| built and run in torch | {t['built']} |",
        f"| traced | {t['traced']} |",
        f"| DEFAULT converts | {t['default_converts']} |",
        f"| `ane_pipeline()` converts | {t['ane_converts']} |",
        f"| DEFAULT converts and has attention | {t['default_converts_with_attention']} |",
        f"| ... with every attention block rewritten | {t['every_attention_block_rewritten']} "
        f"({_cell(t['every_attention_block_rewritten_percent'])}%) |",
        f"| `ane_pipeline()` fp16 PSNR >= {FP16_PSNR_BAR:.0f} dB | {t['ane_psnr_at_least_60']} |",
        "",
        "## Columns",
        "",
        "- **attention**: attention blocks rewritten by `ane::attention_to_einsum` / attention blocks in the "
        "DEFAULT program (its softmax ops of rank >= 3 plus fused `scaled_dot_product_attention` ops; a "
        "mixture-of-experts router's rank-2 softmax is not counted). *all* when every block is rewritten.",
        "- **layout**: transpose, reshape, expand_dims and squeeze ops in the program "
        "(DEFAULT -> ane); in brackets, the ane program's rank-3 region boundaries (`layout_census`).",
        "- **matmul / linear**: matmul and linear ops left in the ane program (the ANE form has neither).",
        "- **PSNR**: fp16 against torch on valid tokens, DEFAULT / ane, in dB (>= 60 is Apple's bar).",
        "- **reason**: why something was left alone (the skip reasons of `ane::attention_to_einsum`), or where "
        "and why the architecture failed (stage: first line of the exception, with the torch op for "
        "frontend failures).",
        "",
        "## Per architecture",
        "",
        "| architecture | class | status | attention | layout | matmul / linear | PSNR DEFAULT / ane | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        attention = ""
        if r.get("attention_blocks") is not None:
            attention = f"{r.get('attention_rewritten') if r.get('attention_rewritten') is not None else '-'}" \
                        f"/{r['attention_blocks']}"
            if r.get("all_attention_rewritten"):
                attention += " all"
        layout = matmul = psnrs = ""
        if r.get("default"):
            layout = str(r["default"]["layout_ops"])
        if r.get("ane"):
            census = r["ane"]["layout_census"]
            layout += f" -> {r['ane']['layout_ops']} ({census['boundary']})"
            matmul = f"{r['ane']['matmul']} / {r['ane']['linear']}"
        if r.get("psnr_default") is not None or r.get("psnr_ane") is not None:
            psnrs = f"{_cell(r.get('psnr_default'))} / {_cell(r.get('psnr_ane'))}"
        reasons = []
        if r.get("failure"):
            failure = r["failure"]
            op = f" (torch op `{failure['torch_op']}`)" if failure.get("torch_op") else ""
            reasons.append(f"{failure['stage']}: {failure['message']}{op}")
        for reason, count in (r.get("attention_skip_reasons") or {}).items():
            reasons.append(f"{count}x {reason}")
        reason_text = "; ".join(reasons).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {r.get('class') or ''} {('(' + r['kind'] + ')') if r.get('kind') not in (None, 'model') else ''} "
                     f"| {_status(r)} | {attention} | {layout} | {matmul} | {psnrs} | {reason_text} |")
    groups = _reason_groups(records)
    titles = {
        "attention": "Why attention was left alone (`ane::attention_to_einsum` skip reasons)",
        "layout": "What `ane::bc1s_layout` left outside the (B, C, 1, S) region",
        "missing_op": "Torch ops the coremltools frontend cannot convert (architectures each blocks)",
        "failure": "Failures, grouped",
    }
    for key in ("attention", "missing_op", "failure", "layout"):
        lines += ["", f"## {titles[key]}", ""]
        if key == "attention":
            lines += ["A mixture-of-experts router's softmax (rank 2) is also reported as \"softmax input is not a "
                      "rank-4 tensor\"; it is not counted among the attention blocks, so an architecture can have "
                      "that reason and every attention block rewritten.", ""]
        lines += ["| reason | architectures | sites | examples |", "|---|---|---|---|"]
        ordered = sorted(groups[key].items(), key=lambda item: (-len(item[1]), item[0]))
        for reason, hits in ordered:
            examples = ", ".join(name for name, _ in hits[:8]) + (", ..." if len(hits) > 8 else "")
            text = reason.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {text} | {len(hits)} | {sum(c for _, c in hits)} | {examples} |")
    return "\n".join(lines) + "\n"


def _meta(wall_seconds: float, timeout: float) -> dict:
    import subprocess

    import coremltools
    import torch
    import transformers

    import milpasses

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": time.strftime("%Y-%m-%d"), "wall_seconds": round(wall_seconds, 1), "timeout": timeout,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "coremltools": coremltools.__version__, "milpasses": milpasses.__version__, "commit": commit}


def _finite(value):
    """``value`` with infinite floats (a PSNR of an exact result) as the strings "inf" / "-inf",
    NaN as null, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _infinite(record: dict) -> dict:
    """A record read back from coverage.json, its "inf" / "-inf" PSNRs floats again."""
    for key in ("psnr_default", "psnr_ane"):
        if isinstance(record.get(key), str):
            record[key] = float(record[key])
    return record


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # a temporary file is private; the report is not
    os.replace(handle.name, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (as in MODEL_MAPPING_NAMES)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per architecture (default 120)")
    parser.add_argument("--fp32", action="store_true", help="also convert with ane_pipeline() in fp32 and "
                                                           "record the relative error against torch")
    parser.add_argument("--resume", action="store_true", help="keep the records already in the output's "
                                                             "coverage.json and sweep only the others; with "
                                                             "--only, sweep those again and keep all the others")
    parser.add_argument("--out", help="directory for coverage.md and coverage.json (default: docs/ for a "
                                      "full sweep or --resume; with --only alone, nothing is written unless --out is given)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    known = architectures()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown model type(s) {unknown}; see transformers' MODEL_MAPPING_NAMES")
    else:
        names = known
    docs = Path(__file__).parents[1] / "docs"
    out = Path(args.out) if args.out else (None if args.only and not args.resume else docs)
    earlier, earlier_seconds = {}, 0.0
    if args.resume:
        if out is None or not (out / "coverage.json").exists():
            parser.error("--resume needs an earlier coverage.json in the output directory (--out)")
        previous = json.loads((out / "coverage.json").read_text())
        earlier = {r["name"]: _infinite(r) for r in previous["records"] if r["name"] in known}
        earlier_seconds = previous["meta"].get("wall_seconds", 0.0)
        if args.only:  # re-sweep the named ones inside the whole report
            earlier = {name: r for name, r in earlier.items() if name not in names}
            names = [name for name in known if name in earlier or name in names]
    started = time.perf_counter()

    def ordered(found: dict) -> list[dict]:
        return [found[name] for name in names if name in found]

    def write(found: dict, complete: bool) -> None:
        records = ordered(found)
        meta = _meta(earlier_seconds + time.perf_counter() - started, args.timeout)
        meta.update(complete=complete, swept=len(records), of=total)
        document = {"meta": meta, "totals": totals(records), "records": _finite(records)}
        _write_atomically(out / "coverage.json", json.dumps(document, indent=1, allow_nan=False) + "\n")
        _write_atomically(out / "coverage.md", render_markdown(records, meta))

    def checkpoint(found: dict) -> None:
        if out is not None and len(found) % CHECKPOINT_EVERY == 0:
            write({**earlier, **found}, complete=False)

    todo = [name for name in names if name not in earlier]
    total = len(known) if args.resume or not args.only else len(names)  # what a complete report holds
    found = {**earlier, **{r["name"]: r for r in run_sweep(
        todo, args.jobs, args.timeout, args.fp32, log=lambda line: print(line, flush=True), on_record=checkpoint)}}
    wall = earlier_seconds + time.perf_counter() - started
    records = ordered(found)
    if out is None:
        meta = _meta(wall, args.timeout)
        print(render_markdown(records, meta))
    else:
        write(found, complete=len(found) == total)
        print(f"wrote {out / 'coverage.md'} and {out / 'coverage.json'}")
    print(json.dumps(totals(records)))
    print(f"wall time: {wall:.0f} s for {len(names)} architectures ({len(todo)} swept in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
