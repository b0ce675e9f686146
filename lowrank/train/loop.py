"""The recipe's second phase: the training steps, with evaluation, rank dynamics, checkpoints and pre-emption
between them.

    state = Loop(run).run()     # LoopState; state.diverged_at / out_of_memory_at say why it stopped early

Where the step is one CUDA graph, the host prepares and launches step k+1 while the GPU runs step k, and reads
step k's loss only after (nothing else then waits on the host); a step whose bookkeeping reads the weights
(evaluation, a checkpoint, a ReLoRA restart) or ends the loop is finished before the next one launches.
"""
import logging
import math
import signal
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lowrank.rundir.progress import ProgressRecord
from lowrank.train import distributed
from lowrank.train.budget import free_cuda_memory
from lowrank.train.checkpoint import save_checkpoint
from lowrank.train.dynamics import summary as dynamics_summary
from lowrank.train.history import add_eval, step_row, write_history
from lowrank.train.loop_state import LoopState
from lowrank.train.preemption import Preempted, sigterm_flag, under_torchrun
from lowrank.train.setup import Run
from lowrank.train.throughput import StepClock

log = logging.getLogger("lowrank.train.recipe")


@dataclass
class Launched:
    """A step launched on the device whose result the host has not read yet."""
    step: int
    handle: object
    tokens: int          # real tokens (padding apart), all ranks
    padded_tokens: int
    t0: float
    lr: float
    overlapped: bool     # launched while the previous step was still in flight


class Loop:
    def __init__(self, run: Run):
        tc = run.cfg.trainer
        self.run_, self.tc, self.state = run, tc, run.state
        self.clock = StepClock(tc.timing_warmup_steps, tc.max_steps - self.state.step)
        self.clock.load_state_dict(self.state.timing)
        self.done_at = None  # when the last step's result arrived: where an overlapped step's time begins
        self.sigterm = None
        self.bar = None
        # what a watcher sees (progress.json) and the per-step history.csv: the main process writes both
        self.progress = ProgressRecord(run.run_dir, tc.max_steps, self.state.step, write=run.main)
        self.history_written = None  # (rows, last row) history.csv held when last written: unchanged, not rewritten

    def run(self) -> LoopState:
        run, tc = self.run_, self.tc
        self.sigterm, previous_handler = sigterm_flag()
        self.bar = tqdm(range(self.state.step, tc.max_steps), desc=run.run_name, dynamic_ncols=True,
                        disable=not (tc.progress_bar and run.main), initial=self.state.step, total=tc.max_steps)
        preempted = False
        try:
            self._steps()
        except Preempted:
            preempted = True
            raise
        except torch.OutOfMemoryError:
            if not run.fit.budget_bytes:
                raise
            free_cuda_memory(run.device)  # the probes fit, yet a later step did not: still a result of the sweep
            run.logger.finish()
            self.state.out_of_memory_at = self.state.step + 1
        finally:
            # Under torchrun the first rank to exit makes the launcher SIGTERM the others: a pre-empted rank keeps
            # the flag so that signal cannot cut its last writes short; it exits 143 itself.
            if previous_handler is not None and not (preempted and under_torchrun()):
                signal.signal(signal.SIGTERM, previous_handler)
            self._write_history()
            self.progress.end(self.state.step)
        self.bar.close()
        return self.state

    def _steps(self) -> None:
        pending = None  # a graphed step in flight whose bookkeeping waits until the next one is launched
        for step in self.bar:
            launched = self._launch(step, overlapped=pending is not None)
            if launched is None:  # eager: a non-finite loss or gradient, found before the update
                self.state.diverged_at = step + 1
                return
            if pending is not None and self._finish(pending):
                return
            pending = launched
            if self._ends_in_place(step):
                pending = None
                if self._finish(launched):
                    return

    def _launch(self, step: int, overlapped: bool) -> Launched | None:
        run, tc = self.run_, self.tc
        idx = distributed.batch_slice(run.train_batches.indices_at(step, tc.batch_size, run.cfg.seed))
        t0 = self.clock.now()
        cpu_batches = [run.train_batches.collate(idx[s:s + run.micro]) for s in range(0, len(idx), run.micro)]
        tokens, padded_tokens = distributed.sum_over_ranks([  # real tokens (padding apart), of all ranks
            sum(int(b["attention_mask"].sum()) for b in cpu_batches),
            sum(b["input_ids"].numel() for b in cpu_batches)])
        handle = run.train_step.launch([
            {k: v.to(run.device, non_blocking=True) for k, v in b.items()
             if not (run.mask_free and k == "attention_mask")} for b in cpu_batches])
        if handle.skipped_update():
            return None
        run.scheduler.step()
        return Launched(step, handle, tokens, padded_tokens, t0, run.scheduler.get_last_lr()[0], overlapped)

    def _finish(self, p: Launched) -> bool:
        """A launched step's bookkeeping once its result is in; True when the run diverged there."""
        run, tc, state = self.run_, self.tc, self.state
        loss_value, grad_norm, stepped = p.handle.result()
        if not (stepped and math.isfinite(loss_value) and math.isfinite(grad_norm)):
            state.diverged_at = p.step + 1
            return True
        t_begin = max(p.t0, self.done_at) if p.overlapped else p.t0
        step_rate = self.clock.record(t_begin, p.tokens, p.padded_tokens)
        self.done_at = self.clock.now() if run.train_step.overlaps else None  # only an overlapped step starts there
        state.step, state.timing = p.step + 1, self.clock.state_dict()
        run.grad_sync.step_done()
        state.recent_losses = (state.recent_losses + [loss_value])[-tc.eval_interval:]
        run.logger.log({"train/loss": loss_value, "train/lr": p.lr, "train/tokens_per_second": step_rate},
                       step=state.step)
        state.step_rows.append(step_row(state.step, loss_value, p.lr, grad_norm, step_rate))
        self.progress.step_done(state.step)
        self.bar.set_postfix(loss=f"{loss_value:.3f}")
        if state.step % tc.eval_interval == 0 or state.step == tc.max_steps:
            self._evaluate()
        run.method.after_step(state.step, tc.max_steps)
        self._checkpoint_or_stop()
        return False

    def _evaluate(self) -> None:
        run, state = self.run_, self.state
        ev = run.objective.evaluate(run.model, run.test_batches, run.eval_batch_size, run.device, run.autocast,
                                    run.mask_free)
        ev = {k: v for k, v in ev.items() if k != "tokens"}  # loss, and accuracy or perplexity
        state.history.append({"step": state.step, **{f"eval_{k}": v for k, v in ev.items()},
                              "train_loss": float(np.mean(state.recent_losses))})
        add_eval(state.step_rows, state.step, {f"eval_{k}": v for k, v in ev.items()})
        self._write_history()
        run.logger.log({f"eval/{k}": v for k, v in ev.items()}, step=state.step)
        log.info("step %d: train_loss %.4f %s", state.step, state.history[-1]["train_loss"],
                 " ".join(f"eval_{k} {v:.4f}" for k, v in ev.items()))
        if run.dynamics is not None:  # ΔW's spectrum now, and how far its top directions moved since the last
            rows = run.dynamics.snapshot(state.step)
            state.dynamics = (state.dynamics or []) + rows
            run.logger.log(dynamics_summary(rows), step=state.step)

    def _checkpoint_or_stop(self) -> None:
        """A checkpoint every `checkpoint_every` steps, and on SIGTERM on any rank (every rank stops there)."""
        run, tc, n = self.run_, self.tc, self.state.step
        preempted = distributed.any_rank(self.sigterm["set"])
        if preempted or (tc.checkpoint_every and n % tc.checkpoint_every == 0 and n < tc.max_steps):
            method_state = run.method.state_dict()
            save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler,
                            self.state.state_dict() | ({"relora": method_state} if method_state is not None else {}))
            self._write_history()  # the rows the checkpoint holds: a resumed run goes on from there
        if preempted:
            log.warning("SIGTERM at step %d: checkpoint written; re-run the same command to resume", n)
            run.logger.finish()
            raise Preempted(143)

    def _write_history(self) -> None:
        """history.csv with every row so far, where there are rows it does not hold yet (main process only)."""
        rows = self.state.step_rows
        if self.run_.main and rows and self.history_written != (len(rows), rows[-1]):
            write_history(self.run_.run_dir, rows)
            self.history_written = (len(rows), dict(rows[-1]))

    def _ends_in_place(self, step: int) -> bool:
        """Steps whose bookkeeping reads the weights (evaluation, a checkpoint) or ends the loop: finished
        before the next step launches."""
        tc, n = self.tc, step + 1
        return (not self.run_.train_step.overlaps or n % tc.eval_interval == 0 or n == tc.max_steps
                or self.sigterm["set"] or bool(tc.checkpoint_every and n % tc.checkpoint_every == 0)
                or self.run_.method.due(n, tc.max_steps))
