// Phone audio in the page: G.711 μ-law exactly as pcm.py codes it, and a resampler to (or from) 8 kHz.

const DECODE = new Int16Array(256); // μ-law byte -> 16-bit sample
for (let u = 0; u < 256; u++) {
  const v = ~u & 0xff;
  const magnitude = (((v & 0x0f) << 3) + 0x84) << ((v & 0x70) >> 4);
  DECODE[u] = v & 0x80 ? 0x84 - magnitude : magnitude - 0x84;
}

function encodeSample(sample) {
  const sign = sample < 0 ? 0x80 : 0;
  const magnitude = Math.min(Math.abs(sample), 32635) + 0x84;
  const exponent = Math.max(32 - Math.clz32(magnitude) - 8, 0);
  const mantissa = (magnitude >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

// pcm.py's table: indexed by (sample + 32768) >> 2, so the page sends byte for byte what the server would
const ENCODE = new Uint8Array(16384);
for (let i = 0; i < ENCODE.length; i++) ENCODE[i] = encodeSample(i * 4 - 32768);

/** 16-bit samples to μ-law bytes. */
export function ulawEncode(samples) {
  const out = new Uint8Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = ENCODE[(samples[i] + 32768) >> 2];
  return out;
}

/** μ-law bytes to 16-bit samples. */
export function ulawDecode(bytes) {
  const out = new Int16Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = DECODE[bytes[i]];
  return out;
}

/** Web Audio floats (-1..1) to 16-bit samples, clipped. */
export function toInt16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) out[i] = Math.max(-32768, Math.min(32767, Math.round(floats[i] * 32768)));
  return out;
}

/**
 * A streaming windowed-sinc resampler (band-limited interpolation): each output sample is the input
 * convolved with a Blackman-windowed sinc centred on the output's time, cut off at 0.45 of the lower rate
 * (3.6 kHz for 8 kHz) so nothing above the phone band folds back, and normalised to unity gain at DC.
 * Any ratio works (48 kHz, 44.1 kHz, ...): output times are rounded to 1/1024 of an input sample, so a few
 * kernels, computed once, serve every sample. `zeros` is the kernel's half width in zero crossings of the
 * sinc: more is a sharper filter and more work.
 */
export class Resampler {
  constructor(inRate, outRate = 8000, zeros = 10) {
    this.step = inRate / outRate; // input samples per output sample
    this.fc = (0.45 * Math.min(inRate, outRate)) / inRate; // cut-off, cycles per input sample
    this.half = Math.ceil(zeros / (2 * this.fc)); // kernel half width, input samples
    this.kernels = new Map(); // phase (1/1024 of a sample past a whole sample) -> normalised taps
    this.buffer = new Float32Array(this.half); // zeros before the first sample: output 0 lands on input 0
    this.time = this.half; // the next output's position in `buffer`
  }

  kernel(phase) {
    let taps = this.kernels.get(phase);
    if (!taps) {
      const { half, fc } = this;
      taps = new Float32Array(2 * half);
      let sum = 0;
      for (let j = 0; j < taps.length; j++) {
        const d = phase / 1024 + half - 1 - j; // output time minus tap time, in input samples
        const x = 2 * fc * d;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const window = 0.42 + 0.5 * Math.cos((Math.PI * d) / half) + 0.08 * Math.cos((2 * Math.PI * d) / half);
        taps[j] = sinc * window;
        sum += taps[j];
      }
      for (let j = 0; j < taps.length; j++) taps[j] /= sum;
      this.kernels.set(phase, taps);
    }
    return taps;
  }

  /** Feed input samples; return the output samples they complete. */
  push(input) {
    const joined = new Float32Array(this.buffer.length + input.length);
    joined.set(this.buffer);
    joined.set(input, this.buffer.length);
    const out = [];
    const half = this.half;
    for (;;) {
      let centre = Math.floor(this.time);
      let phase = Math.round((this.time - centre) * 1024);
      if (phase === 1024) [centre, phase] = [centre + 1, 0];
      if (centre + half >= joined.length) break;
      const taps = this.kernel(phase);
      let sum = 0;
      for (let j = 0, k = centre - half + 1; j < taps.length; j++, k++) sum += joined[k] * taps[j];
      out.push(sum);
      this.time += this.step;
    }
    const keep = Math.max(0, Math.floor(this.time) - half); // the samples the next output may still need
    this.buffer = joined.slice(keep);
    this.time -= keep;
    return Float32Array.from(out);
  }
}
