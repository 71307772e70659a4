"""Each 3x3 convolution shape of ResNet-20 on 28x28 inputs (batch 128), timed alone: forward,
gradient to the input, gradient to the weights, in bf16 and fp32, channels_last and NCHW.
Median of 30 calls after 5 warm-up calls, 2 threads. Run from the repo root:
    .venv/bin/python scripts/bench/conv_shapes.py > results/bench/conv-shapes/output.txt
(Until it moved here the script was results/bench/conv-shapes/run.py.)
"""

import time

import torch

# (in channels, out channels, input side, stride): stage 1, the two stride-2 transitions, 2, 3
SHAPES = [(16, 16, 28, 1), (16, 32, 28, 2), (32, 32, 14, 1), (32, 64, 14, 2), (64, 64, 7, 1)]
HEADER = "shape                 dtype    layout  fwd ms  grad_in ms  grad_w ms  G madds/s fwd"


def median_ms(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def time_shape(cin: int, cout: int, hw: int, s: int, dtype: torch.dtype,
               layout: torch.memory_format) -> str:
    x = torch.randn(128, cin, hw, hw, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(cout, cin, 3, 3, dtype=dtype).contiguous(memory_format=layout)
    args = ([s, s], [1, 1], [1, 1], False, [0, 0], 1)
    out = torch.ops.aten.convolution(x, w, None, *args)
    go = torch.randn_like(out).contiguous(memory_format=layout)
    fwd = median_ms(lambda: torch.ops.aten.convolution(x, w, None, *args))
    gin = median_ms(lambda: torch.ops.aten.convolution_backward(
        go, x, w, None, *args, [True, False, False]))
    gw = median_ms(lambda: torch.ops.aten.convolution_backward(
        go, x, w, None, *args, [False, True, False]))
    madds = out.numel() * cin * 9
    name = f"{cin:2d}->{cout:2d} {hw:2d}x{hw:<2d} stride {s}"
    fmt = "CL" if layout == torch.channels_last else "NCHW"
    return (f"{name:21s} {str(dtype)[6:]:8s} {fmt:6s}  {fwd:6.2f}  {gin:10.2f}  {gw:9.2f}  "
            f"{madds / fwd / 1e6:8.0f}")


def main() -> None:
    torch.set_num_threads(2)
    print(HEADER)
    for cin, cout, hw, s in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for layout in (torch.channels_last, torch.contiguous_format):
                print(time_shape(cin, cout, hw, s, dtype, layout), flush=True)


if __name__ == "__main__":
    main()
