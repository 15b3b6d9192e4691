"""Math answer pairs with expected verdicts: (gold, completion, reward).

Expected verdicts are the mathematically right ones; where math-verify's
documented tolerance decides (6-decimal float rounding), the row says so.
"""

B = "\\boxed"

CASES = [
    # Fractions.
    (r"\frac{1}{2}", r"so \boxed{\frac{1}{2}}", 1.0),
    (r"\frac{1}{2}", r"\boxed{0.5}", 1.0),
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}", 1.0),
    (r"\frac{1}{2}", r"\boxed{1/2}", 1.0),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", 1.0),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", 0.0),
    (r"\frac{3}{4}", r"\boxed{0.75}", 1.0),
    (r"\frac{14}{3}", r"\boxed{4\frac{2}{3}}", 1.0),
    (r"\frac{14}{3}", r"\boxed{4.6667}", 0.0),  # needs 6 decimals
    (r"0.25", r"\boxed{\frac14}", 1.0),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt3}{2}}", 1.0),
    (r"-\frac{1}{2}", r"\boxed{-0.5}", 1.0),
    (r"\frac{1}{2}", r"\boxed{-\frac{1}{2}}", 0.0),
    (r"\dfrac{5}{2}", r"\boxed{2.5}", 1.0),
    # Roots.
    (r"\sqrt{2}", r"\boxed{\sqrt{2}}", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}/2}", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    (r"10\sqrt{2}", r"\boxed{\sqrt{200}}", 1.0),
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}", 1.0),
    (r"2\sqrt{3}", r"\boxed{3\sqrt{2}}", 0.0),
    (r"\sqrt[3]{2}", r"\boxed{2^{1/3}}", 1.0),
    (r"1+\sqrt{5}", r"\boxed{\sqrt{5}+1}", 1.0),
    # Intervals.
    (r"(3,4]", r"\boxed{(3,4]}", 1.0),
    (r"(3,4]", r"\boxed{[3,4]}", 0.0),
    (r"(-\infty,-8)\cup(8,\infty)", r"\boxed{(-\infty, -8) \cup (8, \infty)}",
     1.0),
    (r"(-\infty,-8)\cup(8,\infty)", r"\boxed{(-8, 8)}", 0.0),
    (r"[2,5)", r"\boxed{[2, 5)}", 1.0),
    (r"[2,5)", r"\boxed{(2,5)}", 0.0),
    (r"(-\infty, 0]", r"\boxed{(-\infty,0]}", 1.0),
    # Sets and several answers.
    (r"1,-2", r"\boxed{-2, 1}", 1.0),
    (r"1,-2", r"\boxed{1}", 0.0),
    (r"\{1,2,3\}", r"\boxed{\{3,2,1\}}", 1.0),
    (r"\{1,2\}", r"\boxed{\{1,2,3\}}", 0.0),
    (r"-10879, 10879", r"\boxed{\pm 10879}", 1.0),
    (r"30^\circ, 45^\circ, 105^\circ", r"\boxed{30, 45, 105}", 1.0),
    # Tuples.
    (r"(3, 4)", r"\boxed{(3,4)}", 1.0),
    (r"(3, 4)", r"\boxed{(4,3)}", 0.0),
    (r"\left( 3, \frac{\pi}{2} \right)",
     r"\boxed{\left(3, \frac{\pi}{2}\right)}", 1.0),
    (r"(6,31,-1)", r"\boxed{(6, 31, -1)}", 1.0),
    (r"(1,2,3)", r"\boxed{(1,2,4)}", 0.0),
    # Units, degrees, words, currency, bases.
    (r"864 \mbox{ inches}^2", r"\boxed{864}", 1.0),
    (r"575\text{ students}", r"\boxed{575}", 1.0),
    (r"90^\circ", r"\boxed{90}", 1.0),
    (r"90", r"\boxed{90^\circ}", 1.0),
    (r"45", r"\boxed{45^{\circ}}", 1.0),
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", 1.0),
    (r"\text{Evelyn}", r"\boxed{\text{Bob}}", 0.0),
    (r"\text{(C)}", r"\boxed{C}", 1.0),
    (r"\text{A}", r"\boxed{A}", 1.0),
    (r"5\text{ cm}", r"\boxed{5 \text{ cm}}", 1.0),
    (r"5\text{ cm}", r"\boxed{6 \text{ cm}}", 0.0),
    (r"\$18.90", r"\boxed{18.90}", 1.0),
    (r"\$32,\!348", r"\boxed{32348}", 1.0),
    (r"52_8", r"\boxed{52_8}", 1.0),
    # Percentages.
    (r"44\%", r"\boxed{44\%}", 1.0),
    (r"44\%", r"\boxed{44}", 1.0),
    (r"44\%", r"\boxed{0.44}", 1.0),
    (r"25\%", r"\boxed{30\%}", 0.0),
    # Negatives.
    (r"-3", r"\boxed{-3}", 1.0),
    (r"-3", r"\boxed{3}", 0.0),
    (r"-3", r"\boxed{- 3}", 1.0),
    (r"-\frac{3}{2}", r"\boxed{-1.5}", 1.0),
    (r"-2", r"The answer is $\boxed{-2}$.", 1.0),
    (r"-1", r"\boxed{\cos(\pi)}", 1.0),
    # Scientific notation.
    (r"1.5 \times 10^{3}", r"\boxed{1500}", 1.0),
    (r"1500", r"\boxed{1.5 \times 10^3}", 1.0),
    (r"3 \times 10^{-2}", r"\boxed{0.03}", 1.0),
    (r"3 \times 10^{-2}", r"\boxed{0.3}", 0.0),
    (r"6.02 \times 10^{23}", r"\boxed{6.02\times10^{23}}", 1.0),
    (r"6.02 \times 10^{23}", r"\boxed{6.02\times10^{22}}", 0.0),
    # Equations and `x = 3`.
    (r"3", r"\boxed{x = 3}", 1.0),
    (r"x=5", r"\boxed{5}", 1.0),
    (r"3", r"\boxed{x=4}", 0.0),
    (r"y = 2x + 3", r"\boxed{y=2x+3}", 1.0),
    (r"y = 2x + 3", r"\boxed{2x+3}", 1.0),
    (r"y = 2x + 3", r"\boxed{y = 3x + 2}", 0.0),
    # Several boxes: the last one counts.
    (r"5", r"first \boxed{3}, then corrected: \boxed{5}", 1.0),
    (r"3", r"first \boxed{3}, then corrected: \boxed{5}", 0.0),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{2}} and then \boxed{}", 0.0),
    (r"7", r"\fbox{7}", 1.0),
    (r"7", r"\boxed{6} no wait \fbox{7}", 1.0),
    (r"7", r"\boxed{7} no wait \fbox{6}", 0.0),
    # No box.
    (r"5", r"The answer is 5.", 0.0),
    (r"5", r"$5$", 0.0),
    (r"5", r"", 0.0),
    (r"5", r"\boxed{5", 0.0),
    (r"5", r"<answer>5</answer>", 1.0),
    (r"5", r"<answer>6</answer>", 0.0),
    # Text around the answer.
    (r"12", "Let me think... 3*4 = 12.\nTherefore the final answer is "
     r"$\boxed{12}$. I hope it is correct.", 1.0),
    (r"12", r"Therefore the final answer is $\boxed{13}$. Some say 12.", 0.0),
    (r"\frac{1}{2}", r"We get $\frac{1}{2}$, so the answer is \boxed{\frac12}.",
     1.0),
    (r"4", "<think>maybe \\boxed{3}</think> The answer is \\boxed{4}", 1.0),
    # Integers written differently, constants, complex numbers.
    (r"2125", r"\boxed{2,125}", 1.0),
    (r"2125", r"\boxed{2125.00}", 1.0),
    (r"25", r"\boxed{025}", 1.0),
    (r"100", r"\boxed{10^2}", 1.0),
    (r"8", r"\boxed{2^3}", 1.0),
    (r"3", r"\boxed{\log_2 8}", 1.0),
    (r"0", r"\boxed{0}", 1.0),
    (r"\pi", r"\boxed{\pi}", 1.0),
    (r"2\pi", r"\boxed{6.28}", 0.0),  # needs 6 decimals
    (r"\frac{\pi}{4}", r"\boxed{\pi/4}", 1.0),
    (r"e^2", r"\boxed{e^{2}}", 1.0),
    (r"\infty", r"\boxed{\infty}", 1.0),
    (r"3+4i", r"\boxed{4i+3}", 1.0),
    (r"3+4i", r"\boxed{3-4i}", 0.0),
    # Matrices and polynomials.
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
     r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", 1.0),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
     r"\boxed{\begin{pmatrix}2\\1\end{pmatrix}}", 0.0),
    (r"x^2+2x+1", r"\boxed{(x+1)^2}", 1.0),
    (r"x^2+2x+1", r"\boxed{(x-1)^2}", 0.0),
]
