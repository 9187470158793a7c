"""What bitsandbytes' CPU packed (AVX512-BF16) 4-bit layout costs and saves, per layer (models/quantization.py).

    OMP_NUM_THREADS=1 python scripts/bnb_cpu_packing.py [--shapes 2048x5632 4096x11008] [--tokens 1 512]

Prints, per NF4 layer shape: the conversion to the packed layout and back (what a validation pass followed by a
``state_dict()`` costs), a no-grad pass on the plain path and, on a CPU with AVX512-BF16 only, on the packed path.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_ms(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def layer(n_in: int, n_out: int):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(torch.nn.Linear(n_in, n_out, bias=False).state_dict())
    return q.to("cpu").eval()


def main() -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu as pack
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    from bitsandbytes.functional import has_avx512bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["256x704", "2048x5632", "4096x11008"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    args = parser.parse_args()
    avx = bool(has_avx512bf16())
    print(f"AVX512-BF16: {avx}")
    for shape in args.shapes:
        n_in, n_out = map(int, shape.split("x"))
        q = layer(n_in, n_out)
        w, state = q.weight.data, q.weight.quant_state

        def roundtrip(w=w, state=state):
            unpack(*pack(w.clone(), state))

        line = f"{n_in}x{n_out}: pack+unpack {best_ms(roundtrip):.1f} ms"
        for m in args.tokens:
            x = torch.randn(m, n_in)
            q.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                line += f" | M={m}: plain {best_ms(lambda: q(x)):.1f} ms"  # noqa: B023
                if avx and n_out % 32 == 0:
                    q.support_avx512bf16_for_cpu = True
                    q(x)  # packs once
                    line += f", packed {best_ms(lambda: q(x)):.1f} ms"  # noqa: B023
                    q.weight.data, q.weight.quant_state = unpack(q.weight.data, q.weight.quant_state)
        print(line)


if __name__ == "__main__":
    main()
