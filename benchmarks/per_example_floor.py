"""Lower bound on the step-time ratio of exact per-example norms, counted in multiply-adds.

For the character transformer of ``benchmarks/per_example.py`` (``CharTransformer``: per block a
qkv ``d -> 3d``, a projection ``d -> d`` and an MLP ``d -> 4d -> d``; an output head
``d -> vocab``; causal attention), plain forward+backward costs ``3 B T d_in d_out`` per Linear
layer plus ``6 B T^2 d`` per attention layer. On top of that, exact per-example squared norms need,
per sequence Linear layer:

* ghost norm: ``B T^2 (d_in + d_out)`` (two Gram matrices per example; 3/4 of it from
  ``GHOST_HALF_MIN`` rows on, where only the blocks on and below the diagonal are formed), or
* materialised per-example gradients: ``B T d_in d_out`` -- an extra GEMM when the stock weight
  gradient is kept (bit-identical, the default), about free when it is formed from them
  (``fused=True``: only the ``B d_in d_out`` squares remain).

The probe chooses as ``per_example_ops`` does (ghost iff ``T (d_in + d_out) <= d_in d_out``; with
``fused=True`` it materialises also when ``T >= FUSED_MIN_ROWS``). Normalisation, embedding and
elementwise costs are left out, so real ratios lie somewhat above these floors.

    python benchmarks/per_example_floor.py
"""

from __future__ import annotations

from noisescale.probes.per_example_ops import FUSED_MIN_ROWS, GHOST_HALF_MIN


def floor(d: int, T: int, *, B: int = 16, layers: int = 2, vocab: int = 65, fused: bool = False) -> float:
    """Step-time ratio (probe / plain) if only the extra multiply-adds cost time."""
    linear = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * layers + [(d, vocab)]
    plain = sum(3 * B * T * a * b for a, b in linear) + layers * 6 * B * T * T * d
    extra = 0
    for a, b in linear:
        ghost = T * (a + b) <= a * b
        if fused and (not ghost or T >= FUSED_MIN_ROWS):
            extra += B * a * b
        elif ghost:
            extra += B * T * T * (a + b) * (3 if T >= GHOST_HALF_MIN else 4) // 4
        else:
            extra += B * T * a * b
    return 1 + extra / plain


def main() -> None:
    print("| model | T | floor, default (bit-identical) | floor, fused=True |")
    print("|---|---:|---:|---:|")
    for d, T in [(128, 64), (128, 256), (256, 64), (512, 64), (512, 256)]:
        print(f"| d = {d} | {T} | {floor(d, T):.2f} | {floor(d, T, fused=True):.2f} |")


if __name__ == "__main__":
    main()
