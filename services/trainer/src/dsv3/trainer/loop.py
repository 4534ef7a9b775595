"""`train(config)`: one rank of a dp x ep run under torchrun (or a single plain process).

Order of a step: this rank's slice of the global batch, in `micro_batches` forward/backward passes
(experts through the all-to-all; each loss / (world x micro-batches); on a CPU each micro-batch as
concurrent passes on threads, `passes.py`) -> gradient reduction (replicated over the world, experts
over their replicas) -> global gradient norm -> global loss means and expert loads -> anomaly tests,
agreed over every rank (`anomaly.py`) -> unless the policy drops the update (`reaction.py`): ZeRO-1
AdamW step (the global-norm clip inside its fused kernel) + broadcast, routing-bias update from the
loads summed over micro-batches and ranks -> metrics (rank 0) -> checkpoint every `checkpoint_interval`
steps and at the end. A rollback restores the last checkpoint instead and continues after the bad batch; a
watchdog thread (`watchdog.py`) ends the process when no step completes for `stall_timeout` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from dsv3.balance.bias import all_reduce_loads
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss
from dsv3.model.parallel import parallelize_experts
from dsv3.model.recompute import apply_activation_checkpointing
from dsv3.serving import telemetry
from dsv3.tokenizer import copy_tokenizer_files, load_tokenizer
from dsv3.trainer.allocator import keep_freed_memory
from dsv3.trainer.anomaly import Action, AnomalyDetector, Thresholds, agree
from dsv3.trainer.collector import freeze_startup_objects, thaw_frozen_objects
from dsv3.trainer.config import Layout, SettingsError, TrainConfig
from dsv3.trainer.data import PackedSequences, token_stream
from dsv3.trainer.export import export_model
from dsv3.trainer.faults import FaultInjector
from dsv3.trainer.metrics import MetricsLog, Progress, max_violation
from dsv3.trainer.observe import TrainerTelemetry
from dsv3.trainer.parallel import (
    Groups,
    ShardedAdamW,
    clip_divisor,
    global_grad_norm,
    init_groups,
    reduce_gradients,
)
from dsv3.trainer.passes import ConcurrentPasses, auto_passes
from dsv3.trainer.reaction import Reaction, RunState
from dsv3.trainer.status import Board, State, StatusServer
from dsv3.trainer.watchdog import StallWatchdog

log = logging.getLogger("dsv3.trainer")


@dataclasses.dataclass
class Summary:
    steps: int
    resumed_from: int | None
    final_loss: float | None
    held_out_before: float | None
    held_out_after: float | None
    tokens_per_s: float


def prepare(config: TrainConfig) -> tuple[Layout, ModelConfig, PackedSequences, str]:
    """Everything that can fail on bad settings, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model_config = config.model_config()
    layout = Layout.of(config, world, rank, model_config)
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise SettingsError(
            f"tokenizer: vocabulary of {tokenizer.vocab_size} does not fit the model's vocab_size "
            f"{model_config.vocab_size}"
        )
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device: cuda requested but no CUDA device is available")
    if config.fp8 and device != "cuda":
        raise SettingsError("fp8: FP8 training needs CUDA")
    if config.concurrent_passes > 1 and device != "cpu":
        raise SettingsError(
            f"concurrent_passes: {config.concurrent_passes} passes at once need the CPU (device {device})"
        )
    try:
        data = PackedSequences(
            token_stream(config.data, tokenizer, config.data_field),
            config.seq_len,
            config.seed,
            config.held_out,
            model_config.vocab_size,
        )
    except ValueError as exc:
        raise SettingsError(f"data: {exc}") from exc
    return layout, model_config, data, device


def _loss_parts(model, ids, config: TrainConfig, autocast) -> tuple:
    with autocast():
        out = model(ids)
        parts = language_model_loss(out, ids, config.mtp_weight, config.balance_alpha)
    return out, parts


@dataclasses.dataclass
class StepParts:
    """This rank's loss parts of a step (means over its micro-batches) and its summed expert loads."""

    main: torch.Tensor
    mtp: torch.Tensor | None
    balance: torch.Tensor | None
    loads: torch.Tensor


def forward_backward(
    model,
    ids,
    config: TrainConfig,
    world: int,
    autocast,
    faults: FaultInjector,
    consumed: int,
    passes: ConcurrentPasses | None = None,
) -> StepParts:
    """`micro_batches` forward/backward passes over this rank's slice, gradients accumulating; each
    micro-batch split over `passes` concurrent passes (`dsv3.trainer.passes`) when given.

    Each pass's loss is scaled by 1 / (world x micro-batches x passes): every pass holds the same number
    of sequences, so the accumulated gradient is that of the global batch's mean loss, as one pass."""
    count = config.micro_batches
    passes = passes or ConcurrentPasses(model, 1)
    scale = 1.0 / (world * count * passes.passes)

    def loss_of(part: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        out, parts = _loss_parts(model, part, config, autocast)
        parts = faults.poison(parts, consumed)
        return parts.total * scale, (parts, out.expert_loads.detach())

    sums: list[torch.Tensor | None] = [None, None, None]
    loads = None
    for chunk in ids.chunk(count):
        for parts, step_loads in passes.run(chunk, loss_of):
            for i, value in enumerate((parts.main, parts.mtp, parts.balance)):
                if value is not None:
                    value = value.detach() / (count * passes.passes)
                    sums[i] = value if sums[i] is None else sums[i] + value
            loads = step_loads if loads is None else loads + step_loads
    return StepParts(sums[0], sums[1], sums[2], loads)


@torch.no_grad()
def evaluate(
    model: DeepSeekV3, data: PackedSequences, config: TrainConfig, groups: Groups, device: str
) -> float | None:
    """Mean next-token loss over the held-out sequences (every rank runs its slice: collectives)."""
    ids = data.held_out_batch(config.eval_sequences, groups.layout.rank, groups.layout.world)
    if ids is None:
        return None
    ids = ids.to(device)
    loss = language_model_loss(model(ids, compute_mtp=False), ids).main.detach().double()
    if groups.world is not None:
        dist.all_reduce(loss)
    return float(loss) / groups.layout.world


def _global_means(values: list[torch.Tensor | None], groups: Groups) -> list[float | None]:
    present = [v is not None for v in values]
    device = next(v for v in values if v is not None).device
    flat = torch.stack(
        [
            v.detach().double() if v is not None else torch.zeros((), dtype=torch.float64, device=device)
            for v in values
        ]
    )
    if groups.world is not None:
        dist.all_reduce(flat)
    flat /= groups.layout.world
    return [float(x) if ok else None for x, ok in zip(flat.tolist(), present, strict=True)]


@contextlib.contextmanager
def _status(config: TrainConfig, layout: Layout) -> Iterator[Board | None]:
    if layout.rank != 0:
        yield None
        return
    from dsv3.trainer.checkpointing import restart_count

    board = Board(config.job, config.steps, layout.world, layout.ep, layout.dp, restart_count())
    server = None
    if config.status_port:
        server = StatusServer(board, config.status_host, config.status_port).start()
    try:
        yield board
    except BaseException as exc:
        board.update(state=State.TRAINER_STATE_FAILED, message=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        if server is not None:
            server.stop()


def train(config: TrainConfig) -> Summary:
    telemetry.setup("dsv3-trainer")  # before any client exists: their channels carry the trace context
    layout, model_config, data, device = prepare(config)
    keep_freed_memory()
    torch.manual_seed(config.seed)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    groups = init_groups(layout, backend, config.collective_timeout)
    try:
        with _status(config, layout) as board:
            return _train(config, layout, model_config, data, device, groups, board)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    layout: Layout,
    model_config: ModelConfig,
    data: PackedSequences,
    device: str,
    groups: Groups,
    board: Board | None,
) -> Summary:
    model = DeepSeekV3(model_config).to(device).train()  # same seed: identical on every rank
    if config.fp8:
        model.enable_fp8_training()
    if layout.ep > 1:
        parallelize_experts(model, groups.ep)
    apply_activation_checkpointing(model, config.activation_checkpointing)
    sequences = config.micro_batch_sequences(layout.world)
    count = config.concurrent_passes or auto_passes(device, layout.ep, sequences, torch.get_num_threads())
    passes = ConcurrentPasses(model, count)
    try:
        return _run(config, layout, model, data, device, groups, board, passes)
    finally:
        passes.close()
        thaw_frozen_objects()  # _run froze what set-up left behind


def _run(
    config: TrainConfig,
    layout: Layout,
    model: DeepSeekV3,
    data: PackedSequences,
    device: str,
    groups: Groups,
    board: Board | None,
    passes: ConcurrentPasses,
) -> Summary:
    optimizer = ShardedAdamW(
        model, groups, config.lr, (config.beta1, config.beta2), config.eps, config.weight_decay
    )
    checkpointer = None
    resumed = None
    if config.checkpoint:
        from dsv3.checkpoint import CheckpointClient
        from dsv3.trainer.checkpointing import Checkpointer

        checkpointer = Checkpointer(
            CheckpointClient(config.checkpoint), config.job, model, optimizer, groups, config.keep_last
        )
        resumed = checkpointer.restore() if config.resume_from == "latest" else None
    run = RunState.start(resumed)
    if resumed is not None:
        optimizer.set_step_count(run.step - run.skipped)
    metrics = MetricsLog(config.output_dir) if layout.rank == 0 else None
    reaction = Reaction(config, layout.rank, board, metrics, run)
    if board is not None:
        board.update(
            step=run.step,
            last_checkpoint_step=resumed.step if resumed else None,
            rollbacks=run.rollbacks,  # carried in checkpoint metadata across restarts
            skipped_steps=run.skipped,
        )
    held_out_before = evaluate(model, data, config, groups, device) if run.step == 0 else None
    if checkpointer is not None and resumed is None and config.anomaly_policy == "rollback":
        checkpointer.save(0, 0, 0, run.metadata(None))  # something to roll back to before the first interval
    autocast = (
        (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16))
        if config.bf16
        else contextlib.nullcontext
    )
    mode = config.progress if layout.rank == 0 else "none"
    progress = Progress(mode, config.steps, run.step, config.log_interval)
    if layout.rank == 0:
        log.info(
            "training %s: steps %d-%d of %d, world %d (dp %d x ep %d), batch %d x %d in %d micro-batches, "
            "activation checkpointing %s, anomaly policy %s, concurrent passes %d",
            config.model,
            run.step + 1,
            config.steps,
            config.steps,
            layout.world,
            layout.dp,
            layout.ep,
            config.batch,
            config.seq_len,
            config.micro_batches,
            config.activation_checkpointing,
            config.anomaly_policy,
            passes.passes,
        )
    if board is not None:
        board.update(state=State.TRAINER_STATE_RUNNING)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = FaultInjector.from_env(layout.rank, attempt, config.batch)
    detector = AnomalyDetector(Thresholds.of(config))
    watchdog = StallWatchdog(config.stall_timeout, reaction.stalled).start()
    observer = TrainerTelemetry(layout.rank, config.job, config.metrics_port)
    freeze_startup_objects()  # set-up is over: what exists now lives as long as the run
    last_loss, window_start, window_tokens, rate = None, time.perf_counter(), 0, 0.0
    run_start, run_tokens = time.perf_counter(), 0
    while run.step < config.steps:
        step = run.step + 1
        step_started = time.perf_counter()
        with observer.step(step):
            faults.before_step(step)
            optimizer.set_lr(config.lr_at(step))
            ids = data.batch(run.consumed, config.batch, layout.rank, layout.world).to(device)
            parts = forward_backward(model, ids, config, layout.world, autocast, faults, run.consumed, passes)
            reduce_gradients(model, groups)
            grad_norm = global_grad_norm(model, groups)
            loads = parts.loads
            if groups.world is not None:
                loads = all_reduce_loads(loads.clone(), groups.world)
            loss, mtp, balance = _global_means([parts.main, parts.mtp, parts.balance], groups)
            max_vio = max_violation(loads)
            anomaly = detector.check(step, loss, grad_norm, max_vio)
            anomaly = agree(anomaly, step, groups.world, device)
            action = reaction.decide(anomaly)
            if action in (None, Action.WARNED):
                optimizer.step(clip_divisor(grad_norm, config.grad_clip))
                model.update_routing_bias(loads, config.bias_gamma)
                if anomaly is None:
                    detector.accept(loss, grad_norm)
            optimizer.zero_grad()
            step_tokens = config.batch * config.seq_len
            elapsed = time.perf_counter() - window_start
            window_tokens += step_tokens
            rate = window_tokens / elapsed if elapsed > 0 else 0.0
            if elapsed > 2.0:
                window_start, window_tokens = time.perf_counter(), 0
            if metrics is not None:
                record = {
                    "step": step,
                    "loss": loss,
                    "tokens_per_s": rate,
                    "mtp": mtp,
                    "balance": balance,
                    "grad_norm": grad_norm,
                    "lr": config.lr_at(step),
                    "tokens": run.tokens + step_tokens,
                    "max_vio": max_vio,
                    **reaction.fields(anomaly, action),
                }
                metrics.write(record)
                progress.update(step, record)
            if action == Action.ROLLED_BACK:
                with watchdog.paused():
                    back = checkpointer.restore()
                skip_to = run.consumed + config.batch  # from the checkpoint's position through the bad batch
                run.roll_back(back, skip_to)
                reaction.rolled_back(anomaly, back, skip_to)
                optimizer.set_step_count(run.step - run.skipped)
                detector.reset_collapse()
                continue
            run.advance(config.batch, step_tokens, skipped=action == Action.SKIPPED)
            run_tokens += step_tokens
            last_loss = loss
            if board is not None:
                board.update(step=step, loss=loss, tokens_per_second=rate, degraded=reaction.health.degraded)
            watchdog.beat()
            observer.record(step, loss, rate, max_vio, time.perf_counter() - step_started, step_tokens,
                            anomaly.kind if anomaly is not None else None)  # fmt: skip
            if checkpointer is not None and (step % config.checkpoint_interval == 0 or step == config.steps):
                if board is not None:
                    board.update(state=State.TRAINER_STATE_CHECKPOINTING)
                with watchdog.paused(), observer.checkpoint(step):
                    checkpointer.save(step, run.consumed, run.tokens, run.metadata(loss))
                if board is not None:
                    board.update(state=State.TRAINER_STATE_RUNNING, last_checkpoint_step=step)
    watchdog.stop()
    progress.close()
    held_out_after = evaluate(model, data, config, groups, device)
    if config.export:
        if board is not None:
            board.update(state=State.TRAINER_STATE_EXPORTING)
        if export_model(model, groups, config.export) is not None:
            copy_tokenizer_files(config.tokenizer, config.export)  # serving reads them from the directory
    if board is not None:
        board.update(state=State.TRAINER_STATE_COMPLETED)
    if metrics is not None:
        metrics.close()
        log.info("done: %d steps, held-out loss %s -> %s", config.steps, held_out_before, held_out_after)
    total = time.perf_counter() - run_start
    return Summary(
        config.steps,
        resumed.step if resumed else None,
        last_loss,
        held_out_before,
        held_out_after,
        run_tokens / total if total > 0 else 0.0,
    )
