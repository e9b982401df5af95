"""The table of results.md's section "Reproduced through the study command": each row of results.csv
(the previous driver) beside the same variant's row of reproduced/report.csv (`pyro-vae report`), and
their difference in test log p(x) with the standard error of a difference of two independent means.

    python experiments/compare_models/reproduced/compare.py        # from the repository root
"""
import pandas as pd
old = pd.read_csv("experiments/compare_models/results.csv").set_index("variant")
new = pd.read_csv("experiments/compare_models/reproduced/report.csv").set_index("study.variant")
rows = []
for v in [v for v in old.index if v in new.index]:
    o, n = old.loc[v], new.loc[v]
    diff, se = n.test_log_px_mean - o.test_log_px, (n.test_log_px_se ** 2 + o.test_log_px_se ** 2) ** 0.5
    rows.append({"variant": v, "seeds": f"{int(o.seeds)} / {int(n.seeds)}",
                 "log p(x), results.csv": f"{o.test_log_px:.2f} ± {o.test_log_px_se:.2f}",
                 "log p(x), study": f"{n.test_log_px_mean:.2f} ± {n.test_log_px_se:.2f}",
                 "ELBO, results.csv": f"{o.test_elbo:.2f} ± {o.test_elbo_se:.2f}",
                 "ELBO, study": f"{n.test_elbo_mean:.2f} ± {n.test_elbo_se:.2f}",
                 "Δ log p(x)": f"{diff:+.2f} ± {se:.2f}", "Δ / SE": f"{diff / se:+.1f}"})
print(pd.DataFrame(rows).to_markdown(index=False))
