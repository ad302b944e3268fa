"""The estimator side of frozen text encoders: train on cached token states instead of texts.

:class:`FrozenTextMixin` records which checkpoint a model was fitted with and reads
the token states through :func:`stackcat.features.text_states.token_states`.
"""

from __future__ import annotations

import os

import numpy as np

from stackcat.features.text_states import check_text_model, text_model_identity, token_states

__all__ = ["FrozenTextMixin"]


class FrozenTextMixin:
    """For text estimators that train on cached token states when the encoder stays frozen.

    A model fitted that way records ``text_model_identity_`` and holds no encoder:
    its torch state (pickled, saved) is ``module_`` alone, and the encoder is loaded
    again only if a text to predict is not cached. Otherwise the torch state is
    ``module_`` (encoder included) and ``tokenizer_``.
    """

    @property
    def _torch_attributes(self) -> tuple[str, ...]:
        return ("module_",) if self._fitted_on_cached_text() else ("module_", "tokenizer_")

    def _fitted_on_cached_text(self) -> bool:
        return getattr(self, "text_model_identity_", None) is not None

    def _module_threads(self) -> int | None:
        """Torch threads for the module's own work: ``num_threads`` or 1 on cached states, else unchanged.

        Without BERT the module's matrix products are small: more threads gain
        nothing, and on a busy CPU they lose much (5 folds of FusionClassifier(epochs=0)
        on the demo: 9 s on 1 thread, 52 s on 2, load average ~5).
        """
        if not self._fitted_on_cached_text():
            return None
        return self.num_threads or 1

    def _forget_text_model(self) -> None:
        """Drop what an earlier fit learned about the text model (a refit may switch modes)."""
        for name in ("tokenizer_", "text_model_identity_", "max_length_", "hidden_size_"):
            self.__dict__.pop(name, None)

    def _warm_text_cache(self, texts: list[str], cache_dir: str | os.PathLike) -> None:
        """Encode every text into ``cache_dir`` once (see the estimators' ``warm_cache``)."""
        token_states(texts, self.model_name, int(self.max_length), cache_dir=cache_dir,
                     device=self.device, batch_size=self.predict_batch_size, progress=self.progress)

    def _cached_token_states(self, texts: list[str], cache_dir: str | os.PathLike | None, *,
                             fitting: bool) -> list[np.ndarray]:
        """Token states of ``texts``; in fit, records the checkpoint, later checks it is unchanged."""
        if fitting:
            self.text_model_identity_ = text_model_identity(self.model_name)
            self.max_length_ = int(self.max_length)
        else:
            check_text_model(self.model_name, self.text_model_identity_)
        states = token_states(texts, self.model_name, self.max_length_, cache_dir=cache_dir,
                              device=self.device, batch_size=self.predict_batch_size,
                              progress=self.progress)
        if fitting and states:
            self.hidden_size_ = int(states[0].shape[1])
        return states
