"""Session 13 (run as: python relabel.py DIR, with each call's json.tgz extracted into DIR/callN):
merge each call's bench_linear JSON files into one per call, naming the tree of
every attnlab row that is not main (7c7b1ec) in its impl, and the gate shift where it is not the
bench's default (4)."""
import json, sys, os

def load(path):
    with open(path) as f:
        return json.load(f)

def merge(parts, out):
    """parts: [(json path, tree label or None for main, gate label or None)]."""
    merged, sources = None, {}
    for path, tree, gates in parts:
        d = load(path)
        for r in d["rows"]:
            if tree and r["impl"].startswith("attnlab"):
                r["impl"] = r["impl"].replace("attnlab mosaic_gpu_gk", f"attnlab gk [{tree}]")
            if gates:
                r["impl"] += f" ({gates})"
        sources[os.path.relpath(path, os.path.dirname(out) + "/..")] = {
            "date_utc": d["env"]["date_utc"], "git": d["env"]["git"], "tree": tree or "main",
            "ceilings": d["ceilings"]}
        if merged is None:
            merged = d
        else:
            merged["rows"] += d["rows"]
    merged["merged_from"] = sources
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)

root = sys.argv[1]
merge([(f"{root}/call1/r/gn/bench_linear.json", None, None),
       (f"{root}/call1/r/main/bench_linear.json", None, None),
       (f"{root}/call1/r/bnd/bench_linear.json", "s12-bounded", None)],
      f"{root}/call1/bench_linear.json")
merge([(f"{root}/call2/r/gk/bench_linear.json", "s12-bounded", None)],
      f"{root}/call2/bench_linear.json")
merge([(f"{root}/call3/r/weak/bench_linear.json", "s13-plan-diag", None),
       (f"{root}/call3/r/strong/bench_linear.json", "s13-plan-diag", "strong gates"),
       (f"{root}/call3/r/gk64/bench_linear.json", "s13-plan-diag", None)],
      f"{root}/call3/bench_linear.json")
merge([(f"{root}/call4/r/weak/bench_linear.json", "gk-dispatch", None),
       (f"{root}/call4/r/strong/bench_linear.json", "gk-dispatch", "strong gates")],
      f"{root}/call4/bench_linear.json")
