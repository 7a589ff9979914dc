import runpy

runpy.run_module("eval.stats_dist", run_name="__main__", alter_sys=True)
