// The browser phone: plays Twilio's part of a media stream (connected, start, media, mark, clear, dtmf, stop)
// with the microphone and speakers, and shows what Twilio would do around the stream (browser.* events).

import { Resampler, toInt16, ulawDecode, ulawEncode } from "./codec.js";

const $ = (id) => document.getElementById(id);
const FRAME = 160; // μ-law bytes in 20 ms
const LOUD_DB = -40; // what counts as speech for the latency figure (the parrot model's default threshold)
const LEAD = 0.03; // seconds between the first frame of a reply arriving and it starting to play

const stats = { sent: 0, received: 0, played: 0, marks: 0, clears: 0, calls: 0, turns: 0, latencies: [] };
let current = null;
window.phone = { stats, current: () => current }; // for the tests (and the curious)
window.speechSynthesis?.getVoices(); // Chrome loads its voices on first ask

function token() {
  return new URLSearchParams(location.hash.slice(1)).get("token") || "";
}

function line(kind, who, text, note = "") {
  const p = document.createElement("p");
  p.className = kind;
  if (who) {
    const b = document.createElement("b");
    b.textContent = `${who}: `;
    p.append(b);
  }
  p.append(text);
  if (note) {
    const small = document.createElement("small");
    small.textContent = ` ${note}`;
    p.append(small);
  }
  $("transcript").append(p);
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

function status(text) {
  $("status").textContent = text;
}

function speak(text) {
  // TwiML phrases (the greeting, a goodbye) are Twilio's to speak; here the browser's voice does, when it has one
  const synth = window.speechSynthesis;
  if (!synth || synth.getVoices().length === 0) return Promise.resolve();
  return new Promise((resolve) => {
    const utterance = new SpeechSynthesisUtterance(text);
    const timer = setTimeout(resolve, 1500 + 90 * text.length); // a voice that never says it has finished
    utterance.onend = utterance.onerror = () => {
      clearTimeout(timer);
      resolve();
    };
    synth.speak(utterance);
  });
}

function base64(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}

class Call {
  constructor() {
    this.seq = 0;
    this.chunk = 0;
    this.callSid = this.streamSid = "";
    this.streaming = false;
    this.rest = new Int16Array(0); // 8 kHz samples short of a frame
    this.sources = new Set(); // scheduled agent audio, until it has played
    this.nextTime = 0; // when the audio scheduled so far ends (AudioContext time)
    this.marks = []; // {name, at}: echoed once the audio before them has played
    this.lastLoud = 0; // when the microphone last heard speech (performance.now())
    this.measuredLoud = 0; // the speech the last latency figure was measured from
    this.latency = null; // end of your speech to the answer's first audio playing, ms
    this.ended = false;
    this.resume = "";
  }

  async start() {
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    await this.ctx.audioWorklet.addModule("/phone/capture.js");
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    this.resampler = new Resampler(this.ctx.sampleRate, 8000);
    const source = this.ctx.createMediaStreamSource(this.media);
    this.node = new AudioWorkletNode(this.ctx, "capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    this.node.port.onmessage = (e) => this.captured(e.data);
    source.connect(this.node);
    this.timer = setInterval(() => this.echo(), 10);
    this.open("");
  }

  open(resume) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const protocols = ["switchboard.phone", `token.${token()}`, ...(resume ? [`resume.${resume}`] : [])];
    const ws = (this.ws = new WebSocket(`${scheme}://${location.host}/phone/socket`, protocols));
    ws.onmessage = (e) => this.received(JSON.parse(e.data));
    ws.onclose = (e) => this.closed(ws, e);
    status(resume ? "Reconnecting…" : "Calling…");
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  begin() {
    // Twilio opens the stream after the greeting: `connected`, then `start` with the call's ids
    this.send({ event: "connected", protocol: "Call", version: "1.0.0" });
    this.send({
      event: "start",
      sequenceNumber: String(++this.seq),
      streamSid: this.streamSid,
      start: {
        accountSid: "",
        streamSid: this.streamSid,
        callSid: this.callSid,
        tracks: ["inbound"],
        customParameters: {},
        mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
      },
    });
    this.streaming = true;
    status("Connected: speak now.");
  }

  captured(block) {
    let energy = 0;
    for (const x of block) energy += x * x;
    const db = 10 * Math.log10(energy / block.length || 1e-12);
    $("level").value = Math.max(0, Math.min(1, (db + 60) / 60));
    if (db >= LOUD_DB) this.lastLoud = performance.now();
    if (!this.streaming) return;
    const fresh = toInt16(this.resampler.push(block));
    const samples = new Int16Array(this.rest.length + fresh.length);
    samples.set(this.rest);
    samples.set(fresh, this.rest.length);
    let n = 0;
    for (; n + FRAME <= samples.length; n += FRAME) {
      this.chunk += 1;
      this.send({
        event: "media",
        sequenceNumber: String(++this.seq),
        streamSid: this.streamSid,
        media: {
          track: "inbound",
          chunk: String(this.chunk),
          timestamp: String(this.chunk * 20),
          payload: base64(ulawEncode(samples.subarray(n, n + FRAME))),
        },
      });
      stats.sent += FRAME;
    }
    this.rest = samples.slice(n);
  }

  async received(m) {
    switch (m.event) {
      case "media":
        return this.play(m.media.payload);
      case "mark":
        // played when everything scheduled before it has reached the speakers
        this.marks.push({ name: m.mark.name, at: this.nextTime + (this.ctx.outputLatency || 0) });
        return this.echo();
      case "clear":
        return this.clear();
      case "browser.call":
        this.callSid = m.callSid;
        this.streamSid = m.streamSid;
        $("sid").value = m.callSid;
        if (m.greeting) {
          line("agent", "Agent", m.greeting, "(greeting: Twilio speaks it in the call's voice)");
          await speak(m.greeting);
        }
        return this.begin();
      case "browser.say":
        line("agent", "Agent", m.text, "(Twilio speaks it in the call's voice)");
        return speak(m.text);
      case "browser.turn":
        return this.turn(m);
      case "browser.hangup":
        line("note", "", "The agent hung up.");
        return this.finish();
      case "browser.transfer":
        line("note", "", `The agent would transfer you to ${m.number}.`);
        return this.finish();
      case "browser.reconnect":
        line("note", "", "The agent moved to another server; reconnecting…");
        this.resume = m.callSid; // the server closes this socket next
        return;
    }
  }

  play(payload) {
    const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
    const samples = ulawDecode(bytes);
    const buffer = this.ctx.createBuffer(1, samples.length, 8000);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    if (this.nextTime < now) {
      // nothing playing: a new stretch of the agent's audio starts shortly
      this.nextTime = now + LEAD;
      if (this.lastLoud > this.measuredLoud) {
        const audible = (LEAD + (this.ctx.outputLatency || 0)) * 1000;
        this.latency = Math.round(performance.now() + audible - this.lastLoud);
        this.measuredLoud = this.lastLoud;
      }
    }
    source.start(this.nextTime); // back to back with the audio before it: no gaps
    this.nextTime += buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      stats.played += samples.length;
    };
    stats.received += samples.length;
  }

  echo() {
    if (!this.ctx) return;
    while (this.marks.length && this.marks[0].at <= this.ctx.currentTime) this.echoMark(this.marks.shift().name);
  }

  echoMark(name) {
    this.send({ event: "mark", sequenceNumber: String(++this.seq), streamSid: this.streamSid, mark: { name } });
    stats.marks += 1;
  }

  clear() {
    // as Twilio: drop the audio not yet played, and echo every pending mark at once
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
    }
    this.sources.clear();
    this.nextTime = 0;
    for (const { name } of this.marks.splice(0)) this.echoMark(name);
    stats.clears += 1;
  }

  turn(m) {
    stats.turns += 1;
    stats.latencies.push({ page: this.latency, server: m.first_audio_ms });
    if (m.user) line("you", "You", m.user);
    const timing = [];
    if (this.latency !== null) timing.push(`answer began ${this.latency} ms after you stopped speaking`);
    if (m.first_audio_ms !== null) timing.push(`server: ${Math.round(m.first_audio_ms)} ms`);
    const said = m.agent || (m.interrupted ? "(interrupted before you heard anything)" : "");
    if (said) line("agent", "Agent", said + (m.interrupted && m.agent ? " (interrupted)" : ""), timing.join("; "));
    if (this.latency !== null) $("latency").value = `${this.latency} ms`;
    $("cost").value = `$${m.cost.toFixed(4)}`;
    this.latency = null;
  }

  digit(key) {
    this.send({ event: "dtmf", streamSid: this.streamSid, sequenceNumber: String(++this.seq), dtmf: { track: "inbound_track", digit: key } });
    status(`Pressed ${key}`);
  }

  hangUp() {
    this.send({ event: "stop", sequenceNumber: String(++this.seq), streamSid: this.streamSid, stop: { accountSid: "", callSid: this.callSid } });
    line("note", "", "You hung up.");
    this.finish();
  }

  closed(ws, event) {
    if (ws !== this.ws || this.ended) return;
    if (this.resume) {
      this.streaming = false;
      this.clear();
      const resume = this.resume;
      this.resume = "";
      return this.open(resume);
    }
    if (event.code === 1013) line("note", "", event.reason);
    else if (!this.callSid) line("note", "", "The agent refused the call: open the exact link phone.py printed (its token).");
    else line("note", "", "The call was cut off.");
    this.finish();
  }

  finish() {
    if (this.ended) return;
    this.ended = true;
    this.streaming = false;
    clearInterval(this.timer);
    window.speechSynthesis?.cancel();
    if (this.ws) this.ws.close(1000);
    this.media?.getTracks().forEach((t) => t.stop());
    this.ctx?.close();
    $("level").value = 0;
    $("call").disabled = false;
    $("hangup").disabled = true;
    status("Call ended.");
    if (current === this) current = null;
  }
}

$("call").addEventListener("click", async () => {
  if (current) return;
  if (!token()) {
    status("This page needs its token: open the link that phone.py --browser printed (…/phone#token=…).");
    return;
  }
  const call = (current = new Call());
  stats.calls += 1;
  $("call").disabled = true;
  $("hangup").disabled = false;
  try {
    await call.start();
  } catch (e) {
    line("note", "", `Could not start the call: ${e.message || e}`);
    call.finish();
  }
});

$("hangup").addEventListener("click", () => current?.hangUp());

for (const key of document.querySelectorAll(".keypad button")) {
  key.addEventListener("click", () => current?.digit(key.textContent.trim()));
}
