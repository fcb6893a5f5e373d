"""Data path: read files -> conversations (OpenAI `messages`) -> rendered ids and labels.

`data/` imports no training code.
"""
from tunelab.data.conversation import Conversation, parse_conversation, read_conversations
from tunelab.data.io import iter_jsonl, write_jsonl
from tunelab.data.render import render, render_prompt

__all__ = ["Conversation", "parse_conversation", "read_conversations", "iter_jsonl", "write_jsonl",
           "render", "render_prompt"]
