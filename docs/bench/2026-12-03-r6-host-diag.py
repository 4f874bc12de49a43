# The script behind 2026-12-03-r6-e4b-host-diag.log, run on one H200 at 14bcdae as
#   PYTHONPATH=.:<carried wheels> python3 docs/bench/2026-12-03-r6-host-diag.py gemma-4-e4b default,preset-40gb,preset-24gb
# (a diagnostic kept with its output, not part of the bench).
"""Where does a micro-batch's host time go on Trainer? E4B, rows default / 40gb / 24gb."""
import collections, cProfile, io, pstats, sys, time, traceback, warnings
import torch, transformers
from bench import bench_gpu
from components import answer_trainer

sites = collections.Counter()
def show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        frames = [f for f in traceback.extract_stack()[:-2] if "site-packages/torch/" not in f.filename
                  and "warnings" not in f.filename][-3:]
        sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}" for f in reversed(frames))] += 1
warnings.showwarning = show
warnings.simplefilter("always")

class Sync(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step >= 1 and torch.cuda.is_available(): torch.cuda.set_sync_debug_mode(1)
    def on_train_end(self, args, state, control, **kw):
        if torch.cuda.is_available(): torch.cuda.set_sync_debug_mode(0)

orig_make = answer_trainer.make_trainer
def make(*a, callbacks=(), **k):
    return orig_make(*a, callbacks=[*callbacks, Sync()], **k)
answer_trainer.make_trainer = make

orig_train = transformers.Trainer.train
n = [0]
def train(self, *a, **k):
    n[0] += 1; sites.clear()
    prof = cProfile.Profile(); t = time.perf_counter(); prof.enable()
    try:
        return orig_train(self, *a, **k)
    finally:
        prof.disable()
        print(f"=== train call {n[0]}: grad accum {self.args.gradient_accumulation_steps}, micro {self.args.per_device_train_batch_size}, {time.perf_counter()-t:.1f} s", flush=True)
        s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[-6000:])
        print("sync sites (steps >= 2):", sites.most_common(12), flush=True)
transformers.Trainer.train = train

src = dict(model_dir=sys.argv[1], device="cpu", batch_size=8) if sys.argv[1].startswith("/") else dict(variant=sys.argv[1])
cfg = bench_gpu.BenchConfig(output="/tmp/diag.json", **src, rows=sys.argv[2], repeats=1, timed_steps=2)
bench_gpu.run(cfg)
