from fasttrain.program import run

raise SystemExit(run())
