"""GPU fidelity check: the TensorRT-LLM engine against Hugging Face transformers on the same weights.

Run on a GPU server inside the pinned TensorRT-LLM image, after `python -m build_engine all`:

    python -m build_engine verify            # or: python -m build_engine.gpu.verify --work-dir /engines

Cases: short chat prompts, one prompt longer than 1024 tokens (sliding windows + the global-only RoPE
scaling; 3000 tokens by default), one with an image (vision engine + prompt table), and long-context
"needle" prompts (~32k and ~100k tokens, as far as the profile's max_input_len allows) whose answer, a code
word placed early in a long document, must come back greedy. HF comparisons run where HF fits
(`--hf-max-tokens`); longer cases are checked for retrieval only. For each case the
engine generates greedily with per-step generation logits; transformers then runs the *dequantized* GPTQ
checkpoint (w = q·s in bf16, the exact dequantization the converter tests prove) teacher-forced on the
engine's tokens, so every step is compared on the same prefix. Reported per case: first-token top-1 match,
logit cosine and KL, teacher-forced top-1 agreement, and the length of the common greedy prefix from HF's
own generation. Fails (exit 1) below the thresholds.

Known limit: the engine attends causally over image tokens where HF Gemma 3 attends bidirectionally within
an image, so image cases get looser thresholds (reported separately).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemma3_core import constants as C

TEXT_PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Translate to French: 'The library opens at nine and closes at five.'",
)
IMAGE_PROMPT = "<start_of_image>Describe this image in detail: shapes, colours and their positions."


@dataclass(frozen=True)
class Thresholds:
    text_min_cosine: float = 0.99
    text_min_agreement: float = 0.90
    image_min_cosine: float = 0.95
    image_min_agreement: float = 0.70
    max_first_token_mismatches: int = 0  # across text cases


@dataclass
class Case:
    name: str
    kind: str  # "text" | "long" | "image" | "needle"
    input_ids: list[int]
    image: bytes | None = None
    expect: str | None = None  # needle: the answer the greedy output must contain


@dataclass
class CaseResult:
    name: str
    kind: str
    prompt_tokens: int
    first_top1_match: bool
    first_cosine: float
    first_kl: float
    first_max_abs: float
    agreement: float
    common_greedy_prefix: int
    engine_text_tokens: list[int] = field(default_factory=list)
    hf_compared: bool = True
    retrieved: bool | None = None  # needle cases: did the greedy answer contain the fact


# --- prompts -----------------------------------------------------------------------------------------
def chat_prompt(text: str) -> str:
    from gemma3_core.chat_template import expand_image_markers, render_chat

    return expand_image_markers(render_chat([{"role": "user", "content": text}]))


def long_text(min_tokens: int, encode: Any, *, needle: str = "PAPAYA-7", step: int = 1) -> str:
    """A deterministic document of at least `min_tokens` with a code word at its start and a question
    about it at its end (the needle: the answer sits farther back than any sliding window reaches)."""
    lines = [f"The secret code word for this document is {needle}."]
    i = 0
    # Grow in blocks, measuring now and then: tokenizing a 100k-token prompt per line would be quadratic.
    while len(encode(chat_prompt("\n".join(lines)))) < min_tokens:
        for _ in range(step):
            i += 1
            lines.append(
                f"Paragraph {i}: inventory line {i} lists {i * 7 % 97} crates of item {i * 13 % 251}."
            )
    lines.append("Question: what is the secret code word given at the very beginning? Answer briefly.")
    return "\n".join(lines)


NEEDLES = {32_000: "MANGO-31", 100_000: "QUINCE-58"}
# long_text grows the needle document 200 lines (~5k tokens) between measurements.
NEEDLE_OVERSHOOT = 8192


def needle_lengths(max_input_len: int, wanted: tuple[int, ...] = tuple(NEEDLES)) -> list[int]:
    """The needle prompt lengths the engine can take (prompt + answer must fit max_input_len)."""
    return [n for n in wanted if n + NEEDLE_OVERSHOOT <= max_input_len]


def synthetic_image() -> bytes:
    """A deterministic PNG with a few distinct shapes (no files or downloads needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (235, 235, 220))
    d = ImageDraw.Draw(img)
    d.rectangle((40, 40, 260, 200), fill=(200, 30, 30))
    d.ellipse((330, 60, 590, 300), fill=(30, 90, 200))
    d.polygon([(120, 440), (240, 260), (360, 440)], fill=(40, 160, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_cases(
    tokenizer_dir: Path,
    *,
    long_tokens: int,
    image: bytes | None,
    needle_tokens: list[int] | tuple[int, ...] = (),
) -> list[Case]:
    from gemma3_core.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)

    def enc(text: str) -> list[int]:
        return encode(tok, text)

    cases = [Case(f"text-{i}", "text", enc(chat_prompt(p))) for i, p in enumerate(TEXT_PROMPTS)]
    long_ids = enc(chat_prompt(long_text(long_tokens, enc)))
    cases.append(Case(f"long-{len(long_ids)}", "long", long_ids))
    cases.append(Case("image", "image", enc(chat_prompt(IMAGE_PROMPT)), image or synthetic_image()))
    for n in needle_tokens:
        word = NEEDLES.get(n, f"NEEDLE-{n % 97}")
        ids = enc(chat_prompt(long_text(n, enc, needle=word, step=200)))
        cases.append(Case(f"needle-{len(ids)}", "needle", ids, expect=word))
    return cases


def retrieved(expect: str, answer: str) -> bool:
    """The code word, ignoring case and the hyphen the model may drop or space."""

    def norm(t: str) -> str:
        return "".join(ch for ch in t.upper() if ch.isalnum())

    return norm(expect) in norm(answer)


# --- metrics (pure numpy, unit-tested on CPU) -------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(engine: np.ndarray, hf: np.ndarray) -> dict[str, float]:
    """Next-token logits of one position: top-1 match, cosine, KL(HF || engine), max |diff|."""
    n = min(engine.shape[-1], hf.shape[-1])  # the engine may pad the vocabulary
    e, h = engine[..., :n].astype(np.float64), hf[..., :n].astype(np.float64)
    cos = float(e @ h / (np.linalg.norm(e) * np.linalg.norm(h) + 1e-30))
    lp_h, lp_e = _log_softmax(h), _log_softmax(e)
    kl = float(np.sum(np.exp(lp_h) * (lp_h - lp_e)))
    return {
        "top1_match": float(int(np.argmax(e)) == int(np.argmax(h))),
        "cosine": cos,
        "kl": kl,
        "max_abs": float(np.max(np.abs(e - h))),
    }


def teacher_forced_agreement(engine_tokens: list[int], hf_step_logits: np.ndarray) -> float:
    """Fraction of steps where HF's argmax (given the engine's prefix) equals the engine's token."""
    if not engine_tokens:
        return 1.0
    hf_top = np.argmax(hf_step_logits[: len(engine_tokens)], axis=-1)
    return float(np.mean(hf_top == np.asarray(engine_tokens)))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def evaluate(results: list[CaseResult], t: Thresholds) -> tuple[bool, list[str]]:
    failures: list[str] = []
    text = [r for r in results if r.kind in ("text", "long") and r.hf_compared]
    mismatches = sum(1 for r in text if not r.first_top1_match)
    if mismatches > t.max_first_token_mismatches:
        failures.append(f"{mismatches} text case(s) disagree on the first token")
    for r in results:
        if r.retrieved is False:
            failures.append(f"{r.name}: the greedy answer does not contain the needle")
        if not r.hf_compared:
            continue
        min_cos, min_agree = (
            (t.image_min_cosine, t.image_min_agreement)
            if r.kind == "image"
            else (t.text_min_cosine, t.text_min_agreement)
        )
        if r.first_cosine < min_cos:
            failures.append(f"{r.name}: first-token logit cosine {r.first_cosine:.4f} < {min_cos}")
        if r.agreement < min_agree:
            failures.append(f"{r.name}: teacher-forced agreement {r.agreement:.3f} < {min_agree}")
    return not failures, failures


# --- GPU parts (inside the TensorRT-LLM container) --------------------------------------------------
def image_prompt_table(vision_dir: Path, image: bytes) -> np.ndarray:
    """Vision engine output for one image: [256, hidden] already ÷ the LLM embedding scale."""
    from gemma3_core.images import preprocess_image_bytes
    from gemma3_core.vision import load_vision_runner

    runner = load_vision_runner(vision_dir, "tensorrt")
    return np.asarray(runner(preprocess_image_bytes(image).pixel_values))


ENGINE_STARTUP_LOG: list[str] = []


class _Captured:
    text = ""


@contextlib.contextmanager
def capture_native_output() -> Iterator[_Captured]:
    """Redirect the process's stdout/stderr file descriptors (C++ logging included) into a buffer, and echo
    the buffer to stderr afterwards."""
    captured = _Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace")
            sys.stderr.write(captured.text)
            sys.stderr.flush()


def kv_capacity_report(log: str, profile: Any) -> dict[str, Any]:
    """What the startup log says about the KV pools (found: False when the line is missing)."""
    from build_engine.gpu import kv_capacity as kv

    blocks = kv.parse_blocks_per_window(log)
    if not blocks:
        return {"found": False, "shares_env": os.environ.get(kv.ENV_VAR)}
    tpb = kv.parse_tokens_per_block(log)
    caps = kv.capacity_from_blocks(blocks, profile, tokens_per_block=tpb)
    return {
        "found": True,
        "shares_env": os.environ.get(kv.ENV_VAR),
        "tokens_per_block": tpb,
        "windows": [asdict(c) for c in caps],
        "concurrent_max_len_sequences": kv.concurrent_max_len_sequences(caps),
    }


def run_engine(
    engine_dir: Path, vision_dir: Path, cases: list[Case], windows: list[int], max_new_tokens: int
) -> dict[str, tuple[list[int], np.ndarray]]:
    """Greedy tokens and per-step generation logits from the engine (ModelRunnerCpp = the C++ executor)."""
    os.environ.setdefault("TLLM_LOG_LEVEL", "INFO")  # the KV pool sizes are logged at INFO
    import torch
    from tensorrt_llm.runtime import ModelRunnerCpp

    from gemma3_core.images import expand_image_placeholders, image_content_hash

    vocab = json.loads((engine_dir / "config.json").read_text())["pretrained_config"]["vocab_size"]
    # The executor logs its KV pools ("Blocks per window size") in C++ while it starts: capture fds 1/2.
    with capture_native_output() as startup:
        runner = ModelRunnerCpp.from_dir(
            str(engine_dir),
            max_attention_window_size=windows,
            kv_cache_free_gpu_memory_fraction=0.5,
            gather_generation_logits=True,
        )
    ENGINE_STARTUP_LOG.append(startup.text)
    out: dict[str, tuple[list[int], np.ndarray]] = {}
    for case in cases:
        kwargs: dict[str, Any] = {}
        ids = case.input_ids
        if case.image is not None:
            table = image_prompt_table(vision_dir, case.image)
            ids, extra = expand_image_placeholders(ids, vocab, [image_content_hash(case.image)])
            kwargs = {
                "prompt_table": torch.from_numpy(table).to(torch.bfloat16).unsqueeze(0),
                "prompt_tasks": "0",
                "input_token_extra_ids": [extra],
            }
        res = runner.generate(
            [torch.tensor(ids, dtype=torch.int32)],
            max_new_tokens=max_new_tokens,
            end_id=C.END_OF_TURN_ID,
            pad_id=C.PAD_ID,
            top_k=1,
            temperature=1.0,
            output_generation_logits=True,
            output_sequence_lengths=True,
            return_dict=True,
            **kwargs,
        )
        seq_len = int(res["sequence_lengths"][0][0])
        tokens = res["output_ids"][0][0][len(ids) : seq_len].tolist()
        logits = res["generation_logits"][0][0][: len(tokens)].float().cpu().numpy()
        out[case.name] = (tokens, logits)
        print(f"[verify] engine {case.name}: {len(ids)} prompt tokens → {len(tokens)} generated", flush=True)
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


def dequantized_checkpoint(checkpoint_dir: Path, out_dir: Path) -> Path:
    """A dense bf16 copy of the checkpoint (w = q·s) that plain transformers loads, written once."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from build_engine.gpu.convert import TensorReader, read_quant_linear

    stamp = out_dir / ".dequantized"
    if stamp.exists():
        return out_dir
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    group = next(iter(cfg["quantization_config"]["config_groups"].values()))["weights"]["group_size"]
    cfg.pop("quantization_config")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader = TensorReader(checkpoint_dir)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    n_shard = 0

    def flush() -> None:
        nonlocal shard, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, n_shard = {}, n_shard + 1

    try:
        for name in sorted(reader._where):
            if name.endswith((".weight_scale", ".weight_shape")):
                continue
            if name.endswith(".weight_packed"):
                module = name.removesuffix(".weight_packed")
                ql = read_quant_linear(reader, module, group)
                n, k = ql.q.shape
                w = ql.q.float().reshape(n, k // group, group) * ql.scale.float().unsqueeze(-1)
                shard[f"{module}.weight"] = w.reshape(n, k).to(torch.bfloat16)
            else:
                shard[name] = reader.get(name)
            if sum(t.numel() * t.element_size() for t in shard.values()) > 4 << 30:
                flush()
        flush()
    finally:
        reader.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in checkpoint_dir.iterdir():
        if extra.suffix in (".json", ".model", ".jinja", ".txt") and extra.name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy2(extra, tmp / extra.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    stamp.write_text("ok")
    return out_dir


def run_hf(
    hf_dir: Path,
    cases: list[Case],
    engine_out: dict[str, tuple[list[int], np.ndarray]],
    max_new_tokens: int,
    hf_max_tokens: int,
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Teacher-forced step logits on the engine's tokens, plus HF's own greedy continuation."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma3_core.images import preprocess_image_bytes

    model = AutoModelForImageTextToText.from_pretrained(
        str(hf_dir), torch_dtype=torch.bfloat16, device_map="auto"
    )
    model.eval()
    dev = model.device
    out: dict[str, tuple[np.ndarray, list[int]]] = {}
    for case in cases:
        tokens, _ = engine_out[case.name]
        if len(case.input_ids) > hf_max_tokens:
            print(f"[verify] hf {case.name}: skipped ({len(case.input_ids)} > {hf_max_tokens} tokens)")
            continue
        ids = torch.tensor([case.input_ids + tokens], device=dev)
        kwargs: dict[str, Any] = {}
        if case.image is not None:
            pixels = preprocess_image_bytes(case.image).pixel_values
            kwargs["pixel_values"] = torch.from_numpy(pixels).to(dev, torch.bfloat16)
            kwargs["token_type_ids"] = (ids == C.IMAGE_SOFT_TOKEN_ID).long()
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits[0].float()
            start = len(case.input_ids) - 1
            steps = logits[start : start + max(len(tokens), 1)].cpu().numpy()
            prompt = ids[:, : len(case.input_ids)]
            gen_kwargs = dict(kwargs)
            if "token_type_ids" in gen_kwargs:
                gen_kwargs["token_type_ids"] = gen_kwargs["token_type_ids"][:, : len(case.input_ids)]
            greedy = model.generate(
                input_ids=prompt,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=[C.END_OF_TURN_ID],
                **gen_kwargs,
            )[0][len(case.input_ids) :].tolist()
        out[case.name] = (steps, greedy)
        print(f"[verify] hf {case.name}: done", flush=True)
    return out


def add_verify_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=3000, help="length of the long (> 1024) prompt")
    ap.add_argument(
        "--needle-tokens",
        default=",".join(str(n) for n in NEEDLES),
        help="comma-separated needle prompt lengths (those beyond the profile's max_input_len are skipped)",
    )
    ap.add_argument(
        "--hf-max-tokens",
        type=int,
        default=32_768 + NEEDLE_OVERSHOOT,
        help="compare with HF only on prompts up to this length (HF's memory grows with the prompt)",
    )
    ap.add_argument(
        "--image", type=Path, default=None, help="image file for the image case (default: synthetic)"
    )
    for f in Thresholds.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)


def run_verify(s: Any, args: argparse.Namespace) -> int:
    """Run every case on the engine and on HF, print the agreement table, write report.json."""
    thresholds = Thresholds(**{k: getattr(args, k) for k in Thresholds.__dataclass_fields__})
    if s.tp_size != 1:
        print(
            "[verify] only tp_size=1 engines are verified in-process; build one with TP_SIZE=1",
            file=sys.stderr,
        )
        return 2
    t0 = time.monotonic()
    image = args.image.read_bytes() if args.image else None
    wanted = tuple(int(n) for n in str(args.needle_tokens).split(",") if n.strip())
    needles = needle_lengths(s.profile.max_input_len, wanted)
    for n in sorted(set(wanted) - set(needles)):
        print(
            f"[verify] needle {n}: skipped (profile {s.profile.name} max_input_len {s.profile.max_input_len})"
        )
    cases = build_cases(s.tokenizer_dir, long_tokens=args.long_tokens, image=image, needle_tokens=needles)
    windows = s.profile.attention_window()
    engine_out = run_engine(s.engine_dir, s.vision_dir, cases, windows, args.max_new_tokens)
    capacity = kv_capacity_report("".join(ENGINE_STARTUP_LOG), s.profile)
    hf_dir = dequantized_checkpoint(s.checkpoint_dir, s.work_dir / "hf-dequantized")
    hf_out = run_hf(hf_dir, cases, engine_out, args.max_new_tokens, args.hf_max_tokens)
    from gemma3_core.tokenizer import load_tokenizer

    tok = load_tokenizer(s.tokenizer_dir)
    results = []
    for case in cases:
        tokens, e_logits = engine_out[case.name]
        found = retrieved(case.expect, tok.decode(tokens)) if case.expect else None
        if case.name not in hf_out:
            nan = float("nan")
            results.append(
                CaseResult(
                    case.name,
                    case.kind,
                    len(case.input_ids),
                    False,
                    nan,
                    nan,
                    nan,
                    nan,
                    0,
                    tokens,
                    hf_compared=False,
                    retrieved=found,
                )
            )
            continue
        steps, greedy = hf_out[case.name]
        if tokens:
            first = compare_logits(e_logits[0], steps[0])
        else:
            first = {"top1_match": 0.0, "cosine": 0.0, "kl": float("inf"), "max_abs": float("inf")}
        results.append(
            CaseResult(
                name=case.name,
                kind=case.kind,
                prompt_tokens=len(case.input_ids),
                first_top1_match=bool(first["top1_match"]),
                first_cosine=first["cosine"],
                first_kl=first["kl"],
                first_max_abs=first["max_abs"],
                agreement=teacher_forced_agreement(tokens, steps),
                common_greedy_prefix=common_prefix(tokens, greedy),
                engine_text_tokens=tokens,
                retrieved=found,
            )
        )
    ok, failures = evaluate(results, thresholds)
    if capacity.get("found"):
        print(
            f"[verify] KV pools ({capacity['shares_env'] or 'equal split'}): "
            + ", ".join(f"window {w['window']}: {w['tokens']} tokens" for w in capacity["windows"])
            + f" → {capacity['concurrent_max_len_sequences']:.1f} concurrent max-length sequences"
        )
    else:
        print("[verify] no 'Blocks per window size' line in the engine's startup log")
    print(f"\n{'case':<14}{'kind':<7}{'prompt':>7}{'top1':>6}{'cosine':>9}{'KL':>9}{'agree':>7}{'prefix':>8}")
    for r in results:
        print(
            f"{r.name:<14}{r.kind:<7}{r.prompt_tokens:>7}{'yes' if r.first_top1_match else 'NO':>6}"
            f"{r.first_cosine:>9.4f}{r.first_kl:>9.4f}{r.agreement:>7.2f}{r.common_greedy_prefix:>8}"
        )
    report = {
        "ok": ok,
        "failures": failures,
        "thresholds": asdict(thresholds),
        "results": [asdict(r) for r in results],
        "kv_capacity": capacity,
        "seconds": time.monotonic() - t0,
    }
    out = s.work_dir / "verify" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(("PASS" if ok else "FAIL: " + "; ".join(failures)) + f"  (report: {out})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from build_engine.gpu.settings import PROFILES, settings_from_env

    ap = argparse.ArgumentParser(prog="build_engine.gpu.verify", description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None)
    ap.add_argument("--tp-size", type=int, default=None)
    ap.add_argument("--model-id", default=None)
    add_verify_arguments(ap)
    args = ap.parse_args(argv)
    s = settings_from_env(
        work_dir=args.work_dir, profile=args.profile, tp_size=args.tp_size, model_id=args.model_id
    )
    return run_verify(s, args)


if __name__ == "__main__":
    raise SystemExit(main())
