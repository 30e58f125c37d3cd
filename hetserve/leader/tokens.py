"""The leader's tokenizer: prompt / chat messages -> token ids, token ids -> text, EOS ids."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from ..wire.client import GenerateRequest, ProtocolError


class TextCodec:
    def __init__(self, model_dir: Path, max_context: int):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_context = max_context
        self.eos_ids = self._eos_ids(model_dir)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:
            eos = None
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
        return ids

    def encode(self, request: GenerateRequest) -> list[int]:
        """Token ids of the prompt; ProtocolError when it is empty or does not fit the context."""
        if request.messages is not None:
            if not self.has_chat_template:
                raise ProtocolError("bad_request", "this model has no chat template: send 'prompt' instead", request.id)
            messages = [{"role": role, "content": content} for role, content in request.messages]
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
            except Exception as exc:  # templates raise on inputs they refuse (e.g. roles that do not alternate)
                raise ProtocolError("bad_request", f"the model's chat template refused the messages: {exc}",
                                    request.id) from None
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        ids = list(ids)
        if not ids:
            raise ProtocolError("bad_request", "the prompt is empty", request.id)
        if len(ids) >= self.max_context:
            raise ProtocolError("too_long", f"the prompt has {len(ids)} tokens; this server's context is "
                                f"{self.max_context} tokens, prompt and completion together", request.id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
