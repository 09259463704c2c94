"""`--model hf:DIR`: tiny random wav2vec2 / HuBERT / AST / Whisper encoders written with
save_pretrained, and the real Whisper-base encoder, through the real CLI. Every vector is
checked against an independent plain computation: the model's own feature extractor and
`output_hidden_states=True`, one clip (one 30 s chunk) at a time, frames pooled by hand."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import FSDD, MODELS, read_wave, run_cli, summary_of

WHISPER = MODELS / "whisper-base-encoder"
CLIPS = ("0_george_0.wav", "3_jackson_12.wav", "7_theo_3.wav", "9_yweweler_49.wav",
         "5_nicolas_20.wav")


def _tiny(kind: str, root):
    """A random-weight model directory of `kind` (model + feature extractor)."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    wave_cfg = dict(small, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0)
    if kind == "wav2vec2":  # group-norm conv stem: padding changes it
        model = T.Wav2Vec2Model(T.Wav2Vec2Config(**wave_cfg))
        extractor = T.Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True)
    elif kind == "wav2vec2-ln":  # layer-norm stem and attention mask: clips of any length batch
        model = T.Wav2Vec2Model(T.Wav2Vec2Config(**wave_cfg, feat_extract_norm="layer",
                                                 do_stable_layer_norm=True))
        extractor = T.Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    elif kind == "hubert":
        model = T.HubertModel(T.HubertConfig(**wave_cfg))
        extractor = T.Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=False)
    elif kind == "ast":  # 1.28 s inputs: longer clips are chunked
        model = T.ASTModel(T.ASTConfig(**small, max_length=128, num_mel_bins=128))
        extractor = T.ASTFeatureExtractor(max_length=128, num_mel_bins=128)
    elif kind == "whisper":  # 2 s inputs, 100 frames of 20 ms
        model = T.WhisperModel(T.WhisperConfig(
            d_model=32, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80,
            max_source_positions=100, vocab_size=64, max_target_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=3))
        extractor = T.WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    else:
        raise KeyError(kind)
    path = root / kind
    model.eval().save_pretrained(path)
    extractor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = _tiny(kind, root)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Five real FSDD clips brought to 16 kHz (float WAV: the pipeline does not resample, so
    batches are compared without the resampler's rounding), one of them cut to another's
    length (equal lengths share a batch even where padding would matter), and a 4.4 s clip
    made of them (longer than one AST or tiny-Whisper input: chunked)."""
    import torchaudio.functional as AF

    root = tmp_path_factory.mktemp("hf_wavs")
    waves = {}
    for name in CLIPS:
        wave, rate = read_wave(FSDD / name)
        waves[name] = AF.resample(torch.from_numpy(wave), rate, 16000).numpy()
        sf.write(root / name, waves[name], 16000, subtype="FLOAT")
    twin = waves[CLIPS[2]][: len(waves[CLIPS[1]])]
    twin = np.pad(twin, (0, len(waves[CLIPS[1]]) - len(twin)))
    sf.write(root / "twin.wav", twin, 16000, subtype="FLOAT")
    sf.write(root / "long.wav", np.concatenate([waves[n] for n in CLIPS] * 2), 16000,
             subtype="FLOAT")
    return root


# ---- the independent computation ----------------------------------------------------------------

class Plain:
    """Layer vectors of one clip the plain way (per clip, per chunk, HF's own front end)."""

    def __init__(self, directory):
        from transformers import AutoFeatureExtractor, AutoModel

        self.extractor = AutoFeatureExtractor.from_pretrained(directory)
        model = AutoModel.from_pretrained(directory).eval()
        self.is_whisper = model.config.model_type == "whisper"
        self.is_ast = model.config.model_type == "audio-spectrogram-transformer"
        self.model = model.get_encoder() if self.is_whisper else model

    def frames(self, wave16: np.ndarray, layers) -> dict:
        """{layer or 'last': [T, D] frames covering the clip}."""
        ex = self.extractor
        if self.is_whisper:
            size = ex.n_samples
        elif self.is_ast:
            size = ex.max_length * 160
        else:
            size = len(wave16)
        out = {n: [] for n in (*layers, "last")}
        for start in range(0, len(wave16), size):
            chunk = wave16[start:start + size]
            if start and self.is_ast and len(chunk) < 400:
                break  # a tail too short for one fbank frame is left out
            if self.is_whisper:
                x = ex(chunk, sampling_rate=16000, return_tensors="pt").input_features
            else:
                x = ex(chunk, sampling_rate=16000, return_tensors="pt").input_values
            with torch.no_grad():
                result = self.model(x, output_hidden_states=True)
            for n in out:
                h = (result.last_hidden_state if n == "last" else result.hidden_states[n])[0]
                if self.is_whisper:
                    h = h[: math.ceil(len(chunk) / 320)]
                elif self.is_ast:
                    fbank_frames = 1 + (len(chunk) - 400) // 160
                    grid = h[2:].reshape(12, -1, h.shape[-1])  # [F, T, D]
                    columns = min(max(1, math.ceil(fbank_frames / 10)), grid.shape[1])
                    grid = grid[:, :columns]
                    h = grid.permute(1, 2, 0).reshape(columns, -1)  # [T, D*F], channel-major
                out[n].append(h)
        return {n: torch.cat(v).numpy() for n, v in out.items()}

    def vectors(self, path, layers) -> dict:
        import torchaudio.functional as AF

        wave, rate = read_wave(path)
        wave16 = AF.resample(torch.from_numpy(wave), rate, 16000).numpy()
        return {n: f.mean(axis=0) + f.max(axis=0) for n, f in self.frames(wave16, layers).items()}


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _extract(model_dir, inputs, out, *args):
    result = run_cli("extract", inputs, "--model", f"hf:{model_dir}", "--out", out,
                     "--num-workers", "0", "--save-layers", *args, check=0)
    return summary_of(result)


# ---- tests -----------------------------------------------------------------------------------------

def test_layers_lists_hidden_states_and_default_pair(tiny):
    result = run_cli("layers", "--model", f"hf:{tiny('whisper')}", "--json", check=0)
    data = json.loads(result.stdout)
    assert [r["number"] for r in data["layers"]] == [0, 1, 2, 3]
    assert data["default"] == [2, 3]
    assert all(r["frame_dim"] == 32 and r["stride_ms"] == 20 for r in data["layers"])
    text = run_cli("layers", "--model", f"hf:{tiny('ast')}", check=0).stdout
    assert "384" in text and "100 ms" in text  # 32 channels x 12 frequency patches, 10 frames


@pytest.mark.parametrize("kind", ["wav2vec2", "wav2vec2-ln", "hubert", "ast", "whisper"])
def test_tiny_encoders_match_plain_computation_and_batches(kind, tiny, clips, tmp_path):
    """Every layer, the fusion and the baseline equal the per-clip computation; batches of 8
    (the CLI) and of 1 (the library) agree to 1e-5."""
    import fusefeat

    model_dir = tiny(kind)
    layers = (0, 1, 3)
    summary = _extract(model_dir, clips, tmp_path / "many", "--layers", "0,1,3", "--baseline",
                       "--batch-size", "8")
    assert summary["extracted"] == 7 and summary["layers"] == list(layers)
    fusefeat.extract([str(clips)], model=f"hf:{model_dir}", out=str(tmp_path / "one"),
                     layers="0,1,3", batch_size=1, num_workers=0, progress=False,
                     log=lambda message: None)
    assert torch.is_grad_enabled(), "extract() must not switch autograd off for its caller"
    a, b = fusefeat.load(tmp_path / "many"), fusefeat.load(tmp_path / "one")
    assert a.paths == b.paths == sorted(CLIPS + ("long.wav", "twin.wav"))
    emb = np.asarray(a.embeddings)
    assert _rel(np.asarray(b.embeddings), emb) <= 1e-5, "batch composition changed the vectors"
    plain = Plain(model_dir)
    for i, path in enumerate(a.paths):
        want = plain.vectors(clips / path, layers)
        for n in layers:
            assert _rel(np.asarray(a.layers[n])[i], want[n]) <= 1e-4, (path, n)
        assert _rel(emb[i], np.concatenate([want[n] for n in layers])) <= 1e-4, path
        assert _rel(np.asarray(a.baseline)[i], want["last"]) <= 1e-4, path


def test_whisper_windows_give_the_one_pass_vectors(tiny, clips, tmp_path):
    """Windows of a long clip are whole chunks: cutting at 2 s changes nothing."""
    model_dir = tiny("whisper")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(clips / "long.wav", src / "long.wav")
    _extract(model_dir, src, tmp_path / "whole", "--layers", "1,3")
    _extract(model_dir, src, tmp_path / "windows", "--layers", "1,3", "--window-seconds", "1.5")
    import fusefeat

    whole = np.asarray(fusefeat.load(tmp_path / "whole").embeddings)
    windows = np.asarray(fusefeat.load(tmp_path / "windows").embeddings)
    assert _rel(windows, whole) <= 1e-6


def test_whisper_real_weights_match_plain_computation(clips, tmp_path):
    """The real Whisper-base encoder: padded frames never enter the pooling, a shallow
    selection (only blocks 1..4 run) gives the full run's hidden states, batches change nothing."""
    src = tmp_path / "in"
    src.mkdir()
    for name in CLIPS[:3]:
        shutil.copy(FSDD / name, src / name)  # 8 kHz: resampled by the pipeline
    shallow = _extract(WHISPER, src, tmp_path / "shallow", "--layers", "1,3", "--batch-size", "3")
    full = _extract(WHISPER, src, tmp_path / "full", "--batch-size", "1", "--baseline")
    assert shallow["dim"] == 1024 and full["layers"] == [3, 6] and full["dim"] == 1024
    import fusefeat

    a, b = fusefeat.load(tmp_path / "shallow"), fusefeat.load(tmp_path / "full")
    assert a.meta["weights_id"].startswith("sha256:")
    assert _rel(np.asarray(a.layers[3]), np.asarray(b.layers[3])) <= 1e-5
    plain = Plain(WHISPER)
    for i, path in enumerate(a.paths):
        want = plain.vectors(src / path, (1, 3, 6))
        assert _rel(np.asarray(a.layers[1])[i], want[1]) <= 1e-4, path
        assert _rel(np.asarray(a.layers[3])[i], want[3]) <= 1e-4, path
        assert _rel(np.asarray(b.embeddings)[i], np.concatenate([want[3], want[6]])) <= 1e-4
        assert _rel(np.asarray(b.baseline)[i], want[6]) <= 1e-4  # layer 6 = last_hidden_state
    # pooling the 30 s of padding too would give other vectors: the checks above would see it
    import torchaudio.functional as AF

    wave16 = AF.resample(torch.from_numpy(read_wave(src / a.paths[0])[0]), 8000, 16000).numpy()
    x = plain.extractor(wave16, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        h = plain.model(x, output_hidden_states=True).hidden_states[3][0].numpy()
    assert _rel(np.asarray(a.layers[3])[0], h.mean(0) + h.max(0)) > 1e-2


def test_whisper_front_end_matches_the_feature_extractor(clips):
    """fusefeat's batched torch log-mel equals WhisperFeatureExtractor's on padded input."""
    from transformers import AutoFeatureExtractor

    from fusefeat.frontends import whisper_log_mel

    ex = AutoFeatureExtractor.from_pretrained(WHISPER)
    waves = [read_wave(clips / name)[0] for name in CLIPS[:3]]  # 16 kHz
    rows = torch.zeros(3, ex.n_samples)
    for i, w in enumerate(waves):
        rows[i, : len(w)] = torch.from_numpy(w)
    ours = whisper_log_mel(rows, torch.tensor(ex.mel_filters, dtype=torch.float32), ex.n_fft,
                           ex.hop_length)
    for i, w in enumerate(waves):
        theirs = ex(w, sampling_rate=16000, return_tensors="pt").input_features[0]
        assert float((ours[i] - theirs).abs().max()) <= 1e-5


def test_unsupported_and_missing_models_fail_clearly(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    result = run_cli("layers", "--model", f"hf:{tmp_path / 'bert'}")
    assert result.returncode == 2
    assert "does not know how to feed this model" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("layers", "--model", "hf:nobody/not-a-model-xyz")
    assert result.returncode == 1 and "HF_HUB_OFFLINE" in result.stderr
