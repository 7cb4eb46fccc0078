"""Reed et al.'s char-CNN-RNN text encoder φ(t) (CVPR 2016, "Learning Deep Representations of
Fine-Grained Visual Descriptions")."""

from __future__ import annotations

import torch
from torch import nn

from t2i_fast.data.alphabet import ALPHABET_SIZE, onehot
from t2i_fast.models.config import TextEncoderConfig

_RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


class TextEncoder(nn.Module):
    """Captions → embeddings [..., embedding_dim].

    Captions come one-hot, [N, 70, L] or [B, k, 70, L] (any dtype: the loader's one-hot has
    the images' dtype, uint8 included), or as uint8 character indices [N, L] or [B, k, L].
    A tensor is read as one-hot when it has at least 3 dimensions and dimension -2 is the
    alphabet size (70), so indices with exactly 70 captions per sample would be misread: pass
    those one-hot.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        k, p = config.kernel_size, config.pool_size
        widths = (config.alphabet_size, *config.channels, config.cnn_dim)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv1d(c_in, c_out, k), nn.ReLU(), nn.MaxPool1d(p, p)]
        self.cnn = nn.Sequential(*layers)
        self.rnn = _RNNS[config.rnn](config.cnn_dim, config.rnn_dim, batch_first=True)
        self.proj = nn.Linear(config.rnn_dim, config.embedding_dim)

    def _onehot(self, captions: torch.Tensor) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        if captions.dim() >= 3 and captions.shape[-2] == self.config.alphabet_size:
            return captions.to(dtype)
        if captions.dtype.is_floating_point:
            raise ValueError(f"one-hot captions must be [..., {self.config.alphabet_size}, L], "
                             f"got {tuple(captions.shape)}")
        if self.config.alphabet_size != ALPHABET_SIZE:
            raise ValueError(f"character indices encode {ALPHABET_SIZE} characters, the "
                             f"encoder expects {self.config.alphabet_size}")
        return onehot(captions, dtype)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        x = self._onehot(captions)  # [..., 70, L]
        lead, (c, length) = x.shape[:-2], x.shape[-2:]
        if length < self.config.min_length:
            raise ValueError(f"captions of {length} characters are shorter than the "
                             f"{self.config.min_length} the convolutions need")
        x = self.cnn(x.reshape(-1, c, length))  # [N, cnn_dim, T]
        states, _ = self.rnn(x.transpose(1, 2))  # [N, T, rnn_dim]
        emb = self.proj(states.mean(dim=1))  # [N, E]
        return emb.reshape(*lead, -1)  # [..., E]

    def encode_mean(self, captions: torch.Tensor) -> torch.Tensor:
        """The mean of each sample's k caption embeddings [B, E] (Reed's code averages 4
        captions of an image; the paper does not say), from captions [B, k, 70, L] or indices
        [B, k, L]."""
        emb = self(captions)
        if emb.dim() != 3:
            raise ValueError(f"encode_mean needs k captions per sample, [B, k, 70, L] or "
                             f"[B, k, L]; got {tuple(captions.shape)}")
        return emb.mean(dim=1)
