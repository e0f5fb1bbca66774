"""Model cost: parameters, GFLOPs per chip, forward and training-step speed, peak memory, faster paths.

Examples::

    python tools/benchmark.py model --config vcnet --chip_size 224 --batch_size 2 --device cpu
    python tools/benchmark.py model --device cuda --batch_size 16 --forward_batch_size 64 --amp --channels_last \\
        --agreement --json bf16_cl.json
    python tools/benchmark.py model --config vcnet --device cpu --profile   # time per module (forward)

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-accumulate;
grid-sample, softmax, norms and interpolation are not counted), as in docs/design.md §5.

The faster paths combine freely: ``--amp`` (bfloat16 autocast; deformable sampling, softmax and
losses stay float32), ``--channels_last``, ``--fused_attention`` (``F.scaled_dot_product_attention``),
``--triton_deform_attn`` (the deformable attentions' sampling and sum in one Triton kernel; CUDA, inference),
``--compile`` (``torch.compile``), ``--cuda_graphs`` (inference replayed from a CUDA graph).
``--agreement`` compares the path's forward with the default float32 path on the same weights and
chips: largest logit difference and the share of pixels whose class (argmax of
``softmax((vit + cnn) / 2)``) is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from networks import build_model, get_config
from networks.config import CONFIG_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="vcnet", choices=CONFIG_NAMES, help="model config (default vcnet)")
    parser.add_argument("--chip_size", type=int, default=224, help="chip side in pixels (multiple of 32)")
    parser.add_argument("--batch_size", type=int, default=2, help="chips per training step")
    parser.add_argument("--forward_batch_size", type=int, help="chips per forward pass (default: --batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--fused_attention", action="store_true", help="F.scaled_dot_product_attention in ViT blocks")
    parser.add_argument("--triton_deform_attn", action="store_true",
                        help="the deformable attentions' sampling in one Triton kernel (CUDA, inference only)")
    parser.add_argument("--channels_last", action="store_true", help="channels-last memory format (model and chips)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda_graphs", action="store_true", help="inference replayed from a CUDA graph (CUDA only)")
    parser.add_argument("--no_train", action="store_true", help="time the forward pass only")
    parser.add_argument("--agreement", action="store_true", help="compare with the default float32 path")
    parser.add_argument("--profile", action="store_true", help="also print the forward time per module")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--json", help="also write the results to this JSON file")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _chips(shape, device: torch.device, channels_last: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(args, device: torch.device, cache: bool = True):
    """bfloat16 autocast if asked; ``cache=False`` for CUDA-graph capture, where cached casts would go stale."""
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def _graphed_forward(model, batch: torch.Tensor, args, device: torch.device):
    """A forward replayed from a CUDA graph: the input is copied into a fixed buffer first."""
    static = batch.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), _autocast(args, device, cache=False):
        for _ in range(3):  # warm-up off the graph (cuDNN benchmark, lazy buffers)
            model(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), _autocast(args, device, cache=False):
        outputs = model(static)

    def forward(x: torch.Tensor):
        static.copy_(x)
        graph.replay()
        return outputs
    return forward


def _class_agreement(outputs, reference) -> dict[str, float]:
    vit, cnn = (o.float() for o in outputs)
    ref_vit, ref_cnn = reference
    classes = torch.softmax((vit + cnn) / 2, 1).argmax(1)
    ref_classes = torch.softmax((ref_vit + ref_cnn) / 2, 1).argmax(1)
    return {"max_abs_diff_vit": (vit - ref_vit).abs().max().item(),
            "max_abs_diff_cnn": (cnn - ref_cnn).abs().max().item(),
            "class_agreement": (classes == ref_classes).float().mean().item()}


#: Module classes whose instances are also timed together, wherever they are.
_BY_CLASS = ("MSDeformAttn", "Attention", "Mlp")


def _module_times(model, batch: torch.Tensor, args, device: torch.device, repeats: int) -> dict[str, float]:
    """Inclusive forward milliseconds of the model's children, the backbone's children (module
    lists summed over their items) and of every instance of the classes in ``_BY_CLASS``."""
    watched: list[tuple[str, torch.nn.Module]] = list(model.named_children())
    backbone = getattr(model, "backbone", None)
    for name, module in backbone.named_children() if backbone is not None else []:
        if isinstance(module, torch.nn.ModuleList):
            watched += [(f"backbone.{name}[*]", item) for item in module]
        else:
            watched.append((f"backbone.{name}", module))
    watched += [(f"all {type(m).__name__}", m) for m in model.modules() if type(m).__name__ in _BY_CLASS]
    totals: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in watched:
        def before(module, _inputs, name=name):
            _sync(device)
            starts[(name, id(module))] = time.perf_counter()

        def after(module, _inputs, _outputs, name=name):
            _sync(device)
            totals[name] += time.perf_counter() - starts.pop((name, id(module)))
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.inference_mode(), _autocast(args, device):
            model(batch)  # warm-up
            totals.clear()
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                model(batch)
            _sync(device)
            whole = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    times = {name: round(1000 * seconds / repeats, 2) for name, seconds in totals.items()}
    times["(whole forward)"] = round(1000 * whole / repeats, 2)
    return times


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        print("note: --cuda_graphs needs CUDA; timing the ordinary forward")
        args.cuda_graphs = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    forward_batch = args.forward_batch_size or args.batch_size
    config = get_config(args.config)
    torch.manual_seed(0)
    reference = build_model(config).to(device).eval() if args.agreement else None  # the default path
    config.vit.fused_attention = args.fused_attention
    config.vit.deform_attn_kernel = "triton" if args.triton_deform_attn else "pytorch"
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    chip = torch.randn(1, config.in_channels, args.chip_size, args.chip_size, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(chip)
    gflops = counter.get_total_flops() / 1e9
    runner = torch.compile(model) if args.compile else model

    shape = (config.in_channels, args.chip_size, args.chip_size)
    batch = _chips((forward_batch, *shape), device, args.channels_last)
    result = {
        "config": args.config, "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "chip_size": args.chip_size,
        "batch_size": args.batch_size, "forward_batch_size": forward_batch, "amp_bf16": args.amp,
        "fused_attention": args.fused_attention, "triton_deform_attn": args.triton_deform_attn,
        "channels_last": args.channels_last, "compile": args.compile,
        "cuda_graphs": args.cuda_graphs, "parameters": params, "gflops_per_chip": round(gflops, 2),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()
    start = time.perf_counter()
    if args.cuda_graphs:
        forward_fn = _graphed_forward(runner, batch, args, device)
    else:
        def forward_fn(x):
            with torch.inference_mode(), _autocast(args, device):
                return runner(x)
    forward_fn(batch)  # first call: compilation, graph capture
    _sync(device)
    result["first_forward_s"] = round(time.perf_counter() - start, 2)
    forward_s = _timed(lambda: forward_fn(batch), args.repeats, args.warmup, device)
    result["forward_chips_per_s"] = round(forward_batch / forward_s, 3)
    if args.agreement:
        check = _chips((min(forward_batch, 8), *shape), device, args.channels_last, seed=1)
        with torch.inference_mode():
            expected = tuple(o.float() for o in reference(check.contiguous()))
            # A whole batch, so that a graph or a compiled model sees the shape it was made for.
            got = forward_fn(torch.cat([check, batch[len(check):]]))
        result.update(_class_agreement(tuple(o[:len(check)] for o in got), expected))
        del reference

    if not args.no_train:
        train_batch = _chips((args.batch_size, *shape), device, args.channels_last)
        target = torch.randint(1, config.num_classes, (args.batch_size, args.chip_size, args.chip_size),
                               device=device)

        def train_step():
            with _autocast(args, device):
                vit, cnn = runner(train_batch)
            # Losses in float32, outside autocast.
            loss = 0.5 * F.cross_entropy(cnn.float(), target, ignore_index=0) + \
                0.5 * F.cross_entropy(vit.float(), target, ignore_index=0)
            loss.backward()
            model.zero_grad(set_to_none=True)

        model.train()
        train_s = _timed(train_step, args.repeats, max(args.warmup, 1), device)
        result["train_chips_per_s"] = round(args.batch_size / train_s, 3)
    result["peak_host_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if args.profile:
        model.eval()
        result["forward_ms_per_module"] = _module_times(model, batch, args, device, args.repeats)
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key:>22}:")
            for name, ms in sorted(value.items(), key=lambda kv: -kv[1]):
                print(f"{'':>24}{ms:>10.2f} ms  {name}")
        else:
            print(f"{key:>22}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0
