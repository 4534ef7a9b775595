"""`train(config)`: one rank of a dp x ep run under torchrun (or a single plain process).

Order of a step: this rank's slice of the global batch -> forward (experts through the all-to-all) ->
loss / world -> backward -> gradient reduction (replicated over the world, experts over their replicas)
-> global-norm clip -> ZeRO-1 AdamW step + broadcast -> routing-bias update from the loads summed over
every rank -> metrics (rank 0) -> checkpoint every `checkpoint_interval` steps and at the end.
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
from dsv3.tokenizer import copy_tokenizer_files, load_tokenizer
from dsv3.trainer.config import Layout, SettingsError, TrainConfig
from dsv3.trainer.data import PackedSequences, token_stream
from dsv3.trainer.export import export_model
from dsv3.trainer.metrics import MetricsLog, Progress, max_violation
from dsv3.trainer.parallel import Groups, ShardedAdamW, clip_global_norm, init_groups, reduce_gradients
from dsv3.trainer.status import Board, State, StatusServer

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


def _loss_parts(model, ids, config: TrainConfig, world: int, autocast) -> tuple:
    with autocast():
        out = model(ids)
        parts = language_model_loss(out, ids, config.mtp_weight, config.balance_alpha)
    return out, parts


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
    layout, model_config, data, device = prepare(config)
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
    start = resumed.step if resumed else 0
    consumed = resumed.consumed if resumed else 0
    tokens = resumed.tokens if resumed else 0
    metrics = MetricsLog(config.output_dir) if layout.rank == 0 else None
    if board is not None:
        board.update(step=start, last_checkpoint_step=resumed.step if resumed else None)
    held_out_before = evaluate(model, data, config, groups, device) if start == 0 else None
    autocast = (
        (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16))
        if config.bf16
        else contextlib.nullcontext
    )
    mode = config.progress if layout.rank == 0 else "none"
    progress = Progress(mode, config.steps, start, config.log_interval)
    if layout.rank == 0:
        log.info(
            "training %s: steps %d-%d of %d, world %d (dp %d x ep %d), batch %d x %d",
            config.model,
            start + 1,
            config.steps,
            config.steps,
            layout.world,
            layout.dp,
            layout.ep,
            config.batch,
            config.seq_len,
        )
    if board is not None:
        board.update(state=State.TRAINER_STATE_RUNNING)
    last_loss, window_start, window_tokens, rate = None, time.perf_counter(), 0, 0.0
    run_start, run_tokens = time.perf_counter(), 0
    for step in range(start + 1, config.steps + 1):
        optimizer.set_lr(config.lr_at(step))
        ids = data.batch(consumed, config.batch, layout.rank, layout.world).to(device)
        out, parts = _loss_parts(model, ids, config, layout.world, autocast)
        (parts.total / layout.world).backward()
        reduce_gradients(model, groups)
        grad_norm = clip_global_norm(model, groups, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        loads = out.expert_loads.detach()
        if groups.world is not None:
            loads = all_reduce_loads(loads.clone(), groups.world)
        model.update_routing_bias(loads, config.bias_gamma)
        consumed += config.batch
        step_tokens = config.batch * config.seq_len
        tokens += step_tokens
        window_tokens += step_tokens
        run_tokens += step_tokens
        loss, mtp, balance = _global_means([parts.main, parts.mtp, parts.balance], groups)
        elapsed = time.perf_counter() - window_start
        rate = window_tokens / elapsed if elapsed > 0 else 0.0
        if elapsed > 2.0:
            window_start, window_tokens = time.perf_counter(), 0
        last_loss = loss
        if metrics is not None:
            record = {
                "step": step,
                "loss": loss,
                "tokens_per_s": rate,
                "mtp": mtp,
                "balance": balance,
                "grad_norm": grad_norm,
                "lr": config.lr_at(step),
                "tokens": tokens,
                "max_vio": max_violation(loads),
            }
            metrics.write(record)
            progress.update(step, record)
        if board is not None:
            board.update(step=step, loss=loss, tokens_per_second=rate)
        if checkpointer is not None and (step % config.checkpoint_interval == 0 or step == config.steps):
            if board is not None:
                board.update(state=State.TRAINER_STATE_CHECKPOINTING)
            checkpointer.save(step, consumed, tokens, {"loss": loss})
            if board is not None:
                board.update(state=State.TRAINER_STATE_RUNNING, last_checkpoint_step=step)
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
