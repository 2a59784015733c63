"""Benchmarks of the platform against its limits, each figure beside its baseline in the same run.

    python -m benchmarks [--suite data,train,eval,overhead,search,cluster] [--device cpu|cuda] [--quick]
                         [--out FILE] [--record] [--grid CSV] [--repeats N]

prints a table and writes `reports/performance.md` (CPU, GPU, library versions, date, command). Suites, one
module each (its docstring says what it measures and how):

| suite | measured | baseline in the same run |
|---|---|---|
| data | training images/s per loader worker (one process, one thread) on 500x375 JPEGs | raw archive (PIL + the seed's transforms; torchvision decoder + ours) vs the prepared cache |
| train | training images/s of the platform's own loop (`engine.train_epoch`) | a bare PyTorch loop, same model, optimiser and batches |
| eval | time and peak extra memory of Recall@K + MAP@R + R-precision (`metrics.retrieval_metrics`) | faiss's exact flat index (`IndexFlatIP`) searched at the same depth; the previous implementation; the full N x N similarity matrix, sorted (equal results) |
| overhead | seconds per trial added by a Ray Tune search of identical short trainings (with and without `reuse_actors`) | the same trainings back to back in this process |
| search | epochs a Tune + Optuna TPE + ASHA search spends until it is within 1 point of the grid's best validation Recall@1, over 10 searcher seeds | the full grid (24 points x 6 epochs), and the grid in a random order |

`harness` parses the options, runs the suites named in its registry and writes the report. The GPU check
(`gpu_check`, with its child process `gpu_worker`; `scripts/gpu_check.sh`) is no suite: it runs the trial
loop itself on a GPU, packed and alone, as one prepared command, and writes `reports/gpu.md`.

Imports: the package's modules import only the standard library, numpy, torch, torchvision and PIL at import
time; each suite imports what it measures when it runs, and the harness imports a suite's module only to run
it. `data` and `train` use the platform's own code, which reads its configuration through `tune_upl.config`
(pydantic) and, for `train`, `tune_upl.engine` and adamp (the AdamP row's before); `eval` needs neither (it
imports faiss, a benchmark-only dependency, where installed); `overhead`, `search` and `cluster` import Ray.
"""
