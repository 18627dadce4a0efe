from grounded_diffusion.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

# OpenAI CLIP's ids for this prompt (BOS ... EOS), as its SimpleTokenizer gives them.
REFERENCE = [49406, 320, 8853, 539, 320, 1929, 537, 320, 2368, 49407]


def test_converted_vocabulary_gives_clip_ids(tmp_path):
    tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp_path))
    assert tokenizer("a photograph of a dog and a cat").input_ids == REFERENCE
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408


def test_files_for_old_and_new_readers(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "merges.txt").read_text().startswith("#version")


def test_embedded_model_tokenizer_loads_through_from_pretrained(backbone):
    assert backbone.tokenizer("a photograph of a dog and a cat").input_ids == REFERENCE
