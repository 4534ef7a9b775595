"""dsv3 trainer service: distributed DeepSeek-V3 training under torchrun (`python -m dsv3.trainer`)."""
