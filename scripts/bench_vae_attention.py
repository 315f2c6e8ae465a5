#!/usr/bin/env python
"""Which attention kernel the VAE encoder's one wide head should use. Writes JSON.

    python scripts/bench_vae_attention.py --out docs/bench_vae_attention_h100.json    # ~2 min on one GPU
    python scripts/bench_vae_attention.py --device cpu --size 64 --no-compile --out tiny.json   # checks the script
    python scripts/bench_vae_attention.py --compiled-only --variants sdpa-math,bmm --out OUT.json  # the compiled rows

A training step encodes its render with Stable Diffusion's VAE encoder and differentiates through
it. The encoder's mid-block attends over all (S/8)² latent positions with a single 512-channel head;
no fused attention kernel covers heads that wide (:data:`carv3d.teacher.attention.FUSED_ATTENTION_MAX_HEAD_DIM`),
so ``scaled_dot_product_attention`` falls to the memory-efficient kernel's generic variant. This
times the encoder's forward + backward (gradient into the image, the weights frozen, as in training)
of SD's VAE shape (random weights, ``carv3d.testing.random_sd``) at ``--size``² for each processor
of that layer:

- ``sdpa``: diffusers' ``AttnProcessor2_0`` (SDPA chooses the kernel; the default before this),
- ``sdpa-math``: :class:`carv3d.teacher.attention.MathSDPAttnProcessor` (SDPA held to its math kernel),
- ``bmm``: diffusers' ``AttnProcessor`` (``baddbmm`` + softmax + ``bmm``),

eager and (``--compile``, the default on CUDA) under ``torch.compile``, each with NCHW and with
channels-last tensors (``--layouts``; the compiled teacher runs the VAE channels-last unless
``teacher.channels_last=unet``), and records the median milliseconds (CUDA events) and each variant's
largest difference from an fp32 reference in the encoding and in the image gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("sdpa", "sdpa-math", "bmm")


def log(message: str) -> None:
    print(f"[bench_vae_attention {time.strftime('%H:%M:%S')}] {message}", flush=True)


def processor(variant: str) -> Any:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from carv3d.teacher.attention import MathSDPAttnProcessor

    return {"sdpa": AttnProcessor2_0, "sdpa-math": MathSDPAttnProcessor, "bmm": AttnProcessor}[variant]()


def set_wide_head_processor(vae: Any, variant: str) -> int:
    from carv3d.teacher.attention import wide_head_attention_layers

    layers = wide_head_attention_layers(vae.encoder)
    for layer in layers:
        layer.set_processor(processor(variant))
    return len(layers)


def encode_fn(vae: Any, channels_last: bool) -> Callable[[Any], Any]:
    import torch

    def encode(pixels: Any) -> Any:
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        moments = vae.quant_conv(vae.encoder(pixels))
        return moments.chunk(2, dim=1)[0]

    return encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512, help="image side (the teacher's resolution)")
    parser.add_argument("--batch", type=int, default=1, help="renders encoded per step (R)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compiled-only", action="store_true", help="only the compiled rows")
    parser.add_argument("--layouts", default="nchw,nhwc", help="comma-separated: nchw, nhwc (channels-last)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    layouts = [layout for layout in args.layouts.split(",") if layout]
    variants = [variant for variant in args.variants.split(",") if variant]
    if set(layouts) - {"nchw", "nhwc"} or not layouts:
        parser.error(f"--layouts: expected nchw and/or nhwc, got {args.layouts!r}")
    if set(variants) - set(VARIANTS) or not variants:
        parser.error(f"--variants: expected some of {', '.join(VARIANTS)}, got {args.variants!r}")

    import torch

    from carv3d.io import atomic_write_text
    from carv3d.testing.random_sd import make_vae
    from carv3d.testing.timing import call_times_ms

    device = torch.device(args.device)
    compile_too = (device.type == "cuda") if args.compile is None else args.compile
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    vae = make_vae().eval().requires_grad_(False)
    reference_vae = make_vae().eval().requires_grad_(False)
    reference_vae.load_state_dict(vae.state_dict())
    reference_vae.to(device, torch.float32)
    vae.to(device, dtype)
    pixels = (torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    weights = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(2))
    pixels, weights = pixels.to(device), weights.to(device)

    def forward_backward(fn: Callable[[Any], Any], x: Any) -> tuple[Any, Any]:
        x = x.detach().requires_grad_(True)
        out = fn(x)
        (out.float() * weights).sum().backward()
        return out.detach(), x.grad

    set_wide_head_processor(reference_vae, "bmm")
    ref_out, ref_grad = forward_backward(encode_fn(reference_vae, False), pixels.float())
    layer_count = set_wide_head_processor(vae, "sdpa")

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {"image": [args.batch, 3, args.size, args.size], "dtype": str(dtype).replace("torch.", ""),
                  "wide_head_layers": layer_count},
        "what": "VAE encoder forward + backward into the image (weights frozen), median ms over repeats",
        "rows": [],
    }
    x16 = pixels.to(dtype)
    modes = ([True] if args.compiled_only else [False, True]) if compile_too else [False]
    if args.compiled_only and not compile_too:
        parser.error("--compiled-only needs a compile (CUDA, without --no-compile)")
    for compiled in modes:
        for channels_last in [layout == "nhwc" for layout in layouts]:
            vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for variant in variants:
                set_wide_head_processor(vae, variant)
                torch._dynamo.reset()
                counters = torch._dynamo.utils.counters
                counters.clear()
                fn = encode_fn(vae, channels_last)
                if compiled:
                    fn = torch.compile(fn, dynamic=False)
                started = time.perf_counter()
                out, grad = forward_backward(fn, x16)  # compiles, when compiled
                first_s = time.perf_counter() - started
                times = call_times_ms(lambda: forward_backward(fn, x16), device, args.repeats, warmup=2)
                row = {
                    "variant": variant, "compiled": compiled, "channels_last": channels_last,
                    "ms_median": sorted(times)[len(times) // 2], "ms_min": min(times), "first_call_s": first_s,
                    "max_abs_diff_encoding": float((out.float() - ref_out).abs().max()),
                    "max_abs_diff_image_grad": float((grad.float() - ref_grad).abs().max()),
                    "image_grad_scale": float(ref_grad.abs().max()),
                    # a compiled row is only a compiled row if Dynamo traced it whole, once
                    "graph_breaks": sum(counters["graph_break"].values()) if compiled else None,
                    "recompiles": sum(counters["recompiles"].values()) if compiled else None,
                }
                report["rows"].append(row)
                log(f"{'compiled' if compiled else 'eager'} {'NHWC' if channels_last else 'NCHW'} {variant}: "
                    f"{row['ms_median']:.2f} ms (first call {first_s:.1f} s); max diff encoding "
                    f"{row['max_abs_diff_encoding']:.2e}, grad {row['max_abs_diff_image_grad']:.2e}")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out, json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
