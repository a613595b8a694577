"""How far the Gumbel-max proposal drawn from ``b``-bit uniforms is from the exact proposal ``q``.

Case: one token ``d`` nats above ``V - 1`` equal ones. The noise of index ``k`` is
``g_k = -log(-log((k + 0.5) / 2**b))``; the best token wins when ``g_best + d`` beats the largest
of the others' noise. Summed exactly over the discrete noise (Abel summation over the others'
maximum, whose CDF ``(n / 2**b)**(V-1)`` is negligible below the top few million ``n``), compared
with the exact ``1 / (1 + (V - 1) e^-d)``. Run: ``python bench/gumbel_tail_bias.py`` (numpy only).
Output for V = 262144 is quoted in README.md ("Kernel API").
"""
import numpy as np


def rest_mass_sampled(bits: int, V: int, d: float, top: int = 4_000_000) -> float:
    """Probability that a token other than the best is drawn."""
    S = 2.0 ** bits
    n = np.arange(max(1, int(S) - top), int(S) + 1, dtype=np.float64)  # the others' max has index n - 1
    j = n - 1
    u = (j + 0.5) / S
    e = np.where(u < 0.5, -np.log(u), -np.log1p(-(S - j - 0.5) / S))  # -log u, accurate as u -> 1
    y = -np.log(e) - d  # the best token's noise must exceed this
    below = np.clip(np.floor(np.exp(-np.exp(-y)) * S - 0.5) + 1, 0, S)  # indices k with g_k <= y
    cdf_step = np.exp((V - 1) * np.log(n / S)) - np.exp((V - 1) * np.log(np.maximum(n - 1, 1e-300) / S))
    return 1.0 - float(np.sum(cdf_step * (S - below)) / S)


def main(V: int = 262144):
    for bits in (24, 32):
        for d in (14, 16, 18, 20, 22, 23, 24, 26):
            exact = 1.0 - 1.0 / (1.0 + (V - 1) * np.exp(-d))
            got = rest_mass_sampled(bits, V, d)
            print(f"bits {bits}  d {d:2d}  others' mass: exact {exact:.3e}  sampled {got:.3e}  "
                  f"relative {got / exact - 1:+.2e}  absolute {got - exact:+.2e}")


if __name__ == "__main__":
    main()
