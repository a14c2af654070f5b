"""encode() keeps each token's text in a memo per tokenizer: the texts must be what decoding
each token alone gives, and two tokenizers must not share one memo (the same id is another
text in another vocabulary)."""
from megatron_trapo.data.items import encode
from megatron_trapo.data.records import Record
from megatron_trapo.data.tokenizer import train_bpe_tokenizer


def test_token_texts_are_each_tokenizers_own_decoding(tmp_path):
    words = [f"alpha beta gamma {i}\n\nso {i * 7} is it" for i in range(60)]
    letters = [f"zz yy xx {i}!\n\n{i} then q r s" for i in range(60)]
    toks = [train_bpe_tokenizer(words, 280, tmp_path / "a"),
            train_bpe_tokenizer(letters, 300, tmp_path / "b")]
    records = [Record("What is 3?", "3", solutions=["alpha 3\n\nso 21 is it", "zz 3!\n\nq"])]
    seen = []
    for tok in toks:
        for _ in range(2):  # the second call reads the memo the first one filled
            item = encode(records, tok, "{problem}", None, "full")[0]
            assert item.trace_texts == [[tok.decode([t]) for t in tr] for tr in item.traces]
        seen.append({t: text for tr, texts in zip(item.traces, item.trace_texts)
                     for t, text in zip(tr, texts)})
    shared = set(seen[0]) & set(seen[1])
    assert any(seen[0][t] != seen[1][t] for t in shared)  # one memo for both would be wrong
