"""The sequence classifier of the textbook: an LSTM reads the image step by step, a linear head
reads its last hidden state."""

from __future__ import annotations

from torch import Tensor, nn

from lstmlab.config import ModelConfig
from lstmlab.nn.lstm import LSTM


class SequenceClassifier(nn.Module):
    """LSTM + linear head on the last step's hidden state (both directions' when bidirectional)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = LSTM(
            config.input_size,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            forget_bias=config.forget_bias,
            backend=config.backend,
            cell=config.cell,
            zoneout=tuple(config.zoneout) if isinstance(config.zoneout, list) else config.zoneout,
            recurrent_dropout=config.recurrent_dropout,
        )
        directions = 2 if config.bidirectional else 1
        self.head = nn.Linear(directions * config.hidden_size, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, I) -> logits (B, num_classes)."""
        _, (h_n, _) = self.lstm(x)  # h_n (L*D, B, H)
        directions = 2 if self.config.bidirectional else 1
        # Last layer's final state per direction: forward at t=T-1, reverse at t=0.
        last = h_n[-directions:].transpose(0, 1).reshape(x.size(0), -1)  # (B, D*H)
        return self.head(last)
