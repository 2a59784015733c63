"""Benchmarks of the platform against its limits, each figure beside its baseline in the same run.

    python -m benchmarks [--suite data,train,eval,overhead,search,warm,proxies,cluster] [--device cpu|cuda]
                         [--quick] [--out FILE] [--record] [--grid CSV] [--repeats N] [--eval-sizes N,...]

prints a table and writes `reports/performance.md` (CPU, GPU, library versions, date, command). Suites, one
module each (its docstring says what it measures and how):

| suite | measured | baseline in the same run |
|---|---|---|
| data | training images/s per loader worker (one process, one thread) on 500x375 JPEGs | raw archive (PIL + the seed's transforms; torchvision decoder + ours) vs the prepared cache |
| train | training images/s of the platform's own loop (`engine.train_epoch`) | a bare PyTorch loop, same model, optimiser and batches |
| eval | time and peak extra memory of Recall@K + MAP@R + R-precision (`metrics.retrieval_metrics`), up to Stanford Online Products' 60,502 test images (`--eval-sizes 60502`) | faiss's exact flat index (`IndexFlatIP`) searched at the same depth; the previous implementation and the full N x N similarity matrix, sorted (equal results), up to N = 20,000 |
| overhead | seconds per trial added by a Ray Tune search of identical short trainings (with and without `reuse_actors`) | the same trainings back to back in this process |
| search | epochs a Tune + Optuna TPE (or GP, or random) + ASHA search spends until it is within 1 (and 2) points of the grid's best validation Recall@1, over 20 searcher seeds | the full grid (48 points x 6 epochs), and the grid in a random order |
| warm | the same for TPE warm-started from a search on a second recorded grid (another synthetic set) | the same search cold, seed by seed |
| proxies | one training step's time and the proxies' memory (with AdamP's state) at 11,318 classes (SOP), 3,997 (In-Shop), per loss | the same at 100 classes (CUB) |

`harness` parses the options, runs the suites named in its registry and writes the report. The GPU check
(`gpu_check`, with its child process `gpu_worker`; `scripts/gpu_check.sh`) is no suite: it runs the trial
loop itself on a GPU, packed and alone, as one prepared command, and writes `reports/gpu.md`.

Imports: the package's modules import only the standard library, numpy, torch, torchvision and PIL at import
time; each suite imports what it measures when it runs, and the harness imports a suite's module only to run
it. `data` and `train` use the platform's own code, which reads its configuration through `tune_upl.config`
(pydantic) and, for `train`, `tune_upl.engine` and adamp (the AdamP row's before); `eval` needs neither (it
imports faiss, a benchmark-only dependency, where installed); `proxies` imports the engine (pydantic); `overhead`, `search`, `warm` and `cluster` import Ray.
"""
