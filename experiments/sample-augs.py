import runpy

runpy.run_module("experiments.sample_augs", run_name="__main__", alter_sys=True)
