"""Pick the fastest variant whose gk checks all pass (bench fwd+bwd at T=4096); print its name."""
import json, os, sys
out = sys.argv[1]
best = ("s12main", float("inf"))
for v in ("s12main", "s12da", "s12dsm"):
    chk = os.path.join(out, f"chk_{v}", "check_mosaic_linear.json")
    if v != "s12main":
        try:
            rows = json.load(open(chk))["rows"]
        except Exception:
            continue
        if len(rows) != 3 or any(r["status"] != "ok" for r in rows):
            continue
    try:
        rows = json.load(open(os.path.join(out, f"bench_{v}", "bench_linear.json")))["rows"]
    except Exception:
        continue
    ms = [r["ms"] for r in rows if r["direction"] == "fwd+bwd" and r["status"] == "ok"]
    if ms and ms[0] < best[1]:
        best = (v, ms[0])
print(best[0])
