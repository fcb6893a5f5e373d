"""Data path: read files -> conversations (OpenAI `messages`) -> rendered ids and labels.

`data/` imports no training code.
"""
from tunelab.data.conversation import Conversation, parse_conversation, read_conversations
from tunelab.data.formats import convert_file, convert_record, detect_format
from tunelab.data.io import iter_jsonl, read_records, write_jsonl
from tunelab.data.prompts import load_templates, template_file
from tunelab.data.render import render, render_examples, render_many, render_prompt
from tunelab.data.split import split, split_file
from tunelab.data.validate import validate_file

__all__ = ["Conversation", "parse_conversation", "read_conversations", "iter_jsonl",
           "read_records", "write_jsonl", "convert_file", "convert_record", "detect_format",
           "load_templates", "template_file", "render", "render_many", "render_examples",
           "render_prompt", "split", "split_file", "validate_file"]
