"""Scoring model responses with a local Ollama server (chapter 7's evaluation).

The HTTP code is the real one: a streamed ``/api/chat`` request with deterministic
options (seed 123, temperature 0, 2048-token context).  When no server answers, the
functions raise :class:`OllamaUnavailable` saying how to start one, instead of urllib's
bare connection-refused error: a ``ConnectionError`` and a ``urllib.error.URLError`` both,
so code catching the reference's ``URLError`` still catches it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .instruction import format_input

DEFAULT_CHAT_URL = "http://localhost:11434/api/chat"


class OllamaUnavailable(urllib.error.URLError, ConnectionError):
    """No Ollama server answered (or it refused the request); the message says what to do."""

    def __str__(self):
        return str(self.reason)  # the message alone, not urllib's "<urlopen error ...>" wrapping


def check_if_running(process_name):
    """True when a process whose name contains ``process_name`` (e.g. ``"ollama"``) is running."""
    try:
        import psutil
    except ImportError:
        raise ImportError("check_if_running needs psutil: pip install psutil") from None
    for proc in psutil.process_iter(["name"]):
        if process_name in (proc.info["name"] or ""):
            return True
    return False


def _chat_payload(prompt, model):
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        # Fixed seed and temperature 0: the same prompt gets the same answer.
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def query_model(prompt, model="llama3", url=DEFAULT_CHAT_URL):
    """Send ``prompt`` to the Ollama chat endpoint at ``url`` and return the concatenated streamed reply.

    Raises :class:`OllamaUnavailable` (a ``ConnectionError`` and a ``URLError``) when nothing answers at
    ``url`` (start the server with ``ollama serve``) and ``ValueError`` when the reply is not Ollama's JSON
    lines.
    """
    request = urllib.request.Request(url, data=json.dumps(_chat_payload(prompt, model)).encode("utf-8"),
                                     method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        response = urllib.request.urlopen(request)
    except urllib.error.HTTPError as exc:
        raise OllamaUnavailable(f"the Ollama server at {url} answered HTTP {exc.code} ({exc.reason}); "
                              f"is the model {model!r} pulled (ollama pull {model})?") from None
    except urllib.error.URLError as exc:
        raise OllamaUnavailable(f"no Ollama server answered at {url} ({exc.reason}); start one with "
                              "`ollama serve` (https://ollama.com) or pass its url") from None
    reply = []
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            try:
                reply.append(json.loads(line)["message"]["content"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"unexpected reply from {url}: {line[:200]!r}") from None
    return "".join(reply)


def generate_model_scores(json_data, json_key, model="llama3", url=DEFAULT_CHAT_URL):
    """Ask the Ollama ``model`` to score each entry's ``json_key`` response from 0 to 100.

    Returns the integer scores; replies that are not an integer are reported and skipped,
    as in the reference.  ``url`` (not in the reference) points at another server.
    """
    from tqdm import tqdm

    scores = []
    for entry in tqdm(json_data, desc="Scoring entries"):
        prompt = (
            f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only."
        )
        score = query_model(prompt, model, url)
        try:
            scores.append(int(score))
        except ValueError:
            print(f"Could not convert score: {score}")
    return scores
