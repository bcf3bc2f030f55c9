// The page of `tm-run serve`: plain JavaScript, nothing fetched from outside this server.
"use strict";

const state = {
  token: sessionStorage.getItem("tm-token") || "",
  selected: null,      // the job shown in the player
  watching: null,      // the job whose events are being read
  jobs: new Map(),     // id -> last status
  live: new Map(),     // id -> {stage, step} from the events, fresher than the polled status
  objectUrls: [],
  showing: null,       // "blueprint:ID" or "final:ID" in the player
};
window.tmShown = [];   // what the player showed, in order ("blueprint:ID", "final:ID"): read by the browser tests

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    document.getElementById("token-row").hidden = false;
    throw new Error("this server needs a token: enter it below");
  }
  return response;
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; } catch (e) { return response.statusText; }
}

// --- submitting -------------------------------------------------------------

function numberOrNull(id) {
  const v = document.getElementById(id).value.trim();
  return v === "" ? null : Number(v);
}

async function submit(event) {
  event.preventDefault();
  const errorLine = document.getElementById("form-error");
  errorLine.textContent = "";
  const request = { prompt: document.getElementById("prompt").value };
  for (const [key, id] of [["num_frames", "num-frames"], ["height", "height"], ["width", "width"],
                           ["guidance", "guidance"], ["seed", "seed"]]) {
    const v = numberOrNull(id);
    if (v !== null) request[key] = v;
  }
  const steps = document.getElementById("steps").value.trim();
  if (steps) request.steps = steps.split(",").map((s) => Number(s.trim()));
  const file = document.getElementById("image").files[0];
  let body, type = {};
  if (file) {
    body = new FormData();
    body.append("request", JSON.stringify(request));
    body.append("image:0", file);
  } else {
    body = JSON.stringify(request);
    type = { "Content-Type": "application/json" };
  }
  try {
    const response = await api("/v1/videos", { method: "POST", body: body, headers: type });
    if (!response.ok) { errorLine.textContent = await detail(response); return; }
    const job = await response.json();
    state.jobs.set(job.id, job);
    select(job.id);
    renderQueue();
  } catch (e) {
    errorLine.textContent = e.message;
  }
}

// --- the queue --------------------------------------------------------------

function stageFill(job, s) {
  const p = job.progress || {};
  const steps = (p.stage_steps || [])[s] || 0;
  if (job.state === "done") return [1, true];
  const live = state.live.get(job.id);
  const stage = live ? live.stage : p.stage, step = live ? live.step : p.step;
  if (stage === null || stage === undefined || steps === 0) return [0, false];
  if (s < stage) return [1, true];
  if (s === stage) return [step / steps, step === steps];
  return [0, false];
}

function renderJob(job) {
  let li = document.querySelector(`li.job[data-id="${job.id}"]`);
  if (!li) {
    li = document.createElement("li");
    li.className = "job";
    li.dataset.id = job.id;
    li.innerHTML = '<span class="prompt"></span><span class="state"></span>' +
      '<div class="progress"><div class="stages"></div><span class="progress-text"></span></div>' +
      '<span><button class="cancel" type="button">Cancel</button></span><span class="job-error"></span>';
    li.addEventListener("click", () => select(job.id));
    li.querySelector("button.cancel").addEventListener("click", (e) => { e.stopPropagation(); cancel(job.id); });
    document.getElementById("jobs").appendChild(li);
  }
  li.classList.toggle("selected", job.id === state.selected);
  li.querySelector(".prompt").textContent = job.request.prompt;
  li.querySelector(".prompt").title = job.request.prompt;
  const st = li.querySelector(".state");
  st.textContent = job.state;
  st.className = "state " + job.state;
  const stages = li.querySelector(".stages");
  const count = ((job.progress || {}).stage_steps || []).length;
  while (stages.children.length < count) {
    const bar = document.createElement("div");
    bar.className = "stage-bar";
    bar.innerHTML = '<div class="fill"></div>';
    stages.appendChild(bar);
  }
  for (let s = 0; s < count; s++) {
    const [fraction, full] = stageFill(job, s);
    const bar = stages.children[s];
    bar.title = `stage ${s}`;
    bar.classList.toggle("done", full);
    bar.firstChild.style.width = Math.round(100 * fraction) + "%";
  }
  li.querySelector(".progress-text").textContent = progressText(job);
  li.querySelector("button.cancel").hidden = !(job.state === "queued" || job.state === "running");
  li.querySelector(".job-error").textContent = job.error && job.state === "failed" ? job.error : "";
}

function progressText(job) {
  const p = job.progress || {};
  if (job.state === "done" && job.finished && job.started) return `done in ${(job.finished - job.started).toFixed(1)} s`;
  if (job.state === "queued") return job.queue_position ? `${job.queue_position} ahead` : "next";
  if (job.state !== "running") return "";
  const live = state.live.get(job.id) || {};
  const stage = live.stage ?? p.stage, step = live.step ?? p.step;
  if (stage === null || stage === undefined) return "starting";
  const steps = (p.stage_steps || [])[stage];
  const eta = live.eta ?? p.eta_seconds;
  return `stage ${stage}: step ${step}/${steps}` + (eta !== null && eta !== undefined ? `, about ${Math.ceil(eta)} s left` : "");
}

function renderQueue() {
  const ids = [...state.jobs.keys()];
  const list = document.getElementById("jobs");
  for (const job of [...state.jobs.values()].sort((a, b) => b.created - a.created)) {
    renderJob(job);
    list.appendChild(document.querySelector(`li.job[data-id="${job.id}"]`));  // newest first
  }
  for (const li of [...list.children]) if (!ids.includes(li.dataset.id)) li.remove();
}

async function poll() {
  try {
    const response = await api("/v1/videos?limit=30");
    if (response.ok) {
      const data = await response.json();
      state.jobs = new Map(data.jobs.map((j) => [j.id, j]));
      renderQueue();
      if (state.selected && state.jobs.has(state.selected)) showJob(state.jobs.get(state.selected));
    }
  } catch (e) { /* shown by the token row; polled again */ }
  setTimeout(poll, 1000);
}

async function cancel(id) {
  const response = await api(`/v1/videos/${id}`, { method: "DELETE" });
  if (!response.ok && response.status !== 409) document.getElementById("viewer-error").textContent = await detail(response);
  const status = await api(`/v1/videos/${id}`);
  if (status.ok) { state.jobs.set(id, await status.json()); renderQueue(); }
}

// --- the player -------------------------------------------------------------

async function mediaUrl(path) {
  if (!state.token) return path + "?t=" + Date.now();
  const response = await api(path);  // a <video> cannot send the header: fetch it, play the bytes
  const url = URL.createObjectURL(await response.blob());
  state.objectUrls.push(url);
  return url;
}

async function showVideo(kind, job, path) {
  const key = kind + ":" + job.id;
  // once per job and kind, and never the blueprint after the final video
  if (state.showing === key || (kind === "blueprint" && state.showing === "final:" + job.id)) return;
  state.showing = key;
  const video = document.createElement("video");
  video.id = kind === "final" ? "final-video" : "blueprint-video";
  video.dataset.job = job.id;
  video.muted = true; video.loop = true; video.autoplay = true; video.playsInline = true; video.controls = true;
  video.src = await mediaUrl(path);
  if (state.showing !== key) return;  // another job was selected meanwhile
  document.getElementById("player").replaceChildren(video);
  window.tmShown.push(key);
  document.getElementById("viewer-note").textContent = kind === "final"
    ? `final video, ${job.plan.save_fps} fps` : "6 fps blueprint: the whole clip, while the 12 and 24 fps stages run";
  video.play().catch(() => {});
}

function showJob(job) {
  document.getElementById("viewer-title").textContent = job.request.prompt;
  document.getElementById("viewer-error").textContent = job.state === "failed" ? job.error : "";
  if (job.video_url) showVideo("final", job, job.video_url);
  else if (job.blueprint_url) showVideo("blueprint", job, job.blueprint_url);
  else if (job.state !== "done") {
    if (!(state.showing || "").endsWith(":" + job.id)) {
      state.showing = null;
      document.getElementById("player").replaceChildren();
    }
    document.getElementById("viewer-note").textContent = job.state === "queued" ? "waiting in the queue" :
      job.state === "running" ? "stage 0 running: the blueprint appears when it is decoded" : "";
  }
}

function select(id) {
  if (state.selected !== id) state.showing = null;
  state.selected = id;
  const job = state.jobs.get(id);
  if (job) { showJob(job); renderQueue(); }
  if (state.watching !== id) watch(id);
}

// Server-sent events through fetch (EventSource cannot send the token header).
async function watch(id) {
  state.watching = id;
  let lastId = "";
  for (let attempt = 0; attempt < 5 && state.watching === id; attempt++) {
    let response;
    try {
      response = await api(`/v1/videos/${id}/events`, { headers: lastId ? { "Last-Event-ID": lastId } : {} });
    } catch (e) { return; }
    if (!response.ok) return;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finished = false;
    while (state.watching === id) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = { event: "message", data: "", id: "" };
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event.event = line.slice(7);
          else if (line.startsWith("data: ")) event.data += line.slice(6);
          else if (line.startsWith("id: ")) event.id = line.slice(4);
        }
        if (!event.data) continue;
        lastId = event.id || lastId;
        if (onEvent(id, event.event, JSON.parse(event.data))) finished = true;
      }
    }
    if (finished || state.watching !== id) return;
  }
}

function onEvent(id, kind, data) {
  const job = state.jobs.get(id);
  if (kind === "step") {
    state.live.set(id, { stage: data.stage, step: data.step, eta: data.eta_seconds });
    if (job) { job.state = "running"; renderJob(job); }
  } else if (kind === "blueprint" && job) {
    job.blueprint_url = data.url;
    if (state.selected === id && !job.video_url) showVideo("blueprint", job, data.url);
  } else if (kind === "state") {
    if (job) {
      job.state = data.state;
      job.error = data.error || null;
      if (data.state === "done") job.video_url = data.url || `/v1/videos/${id}/video.mp4`;
      renderJob(job);
      if (state.selected === id) showJob(job);
    }
    return ["done", "failed", "cancelled"].includes(data.state);
  }
  return false;
}

document.getElementById("submit-form").addEventListener("submit", submit);
document.getElementById("token-save").addEventListener("click", () => {
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("tm-token", state.token);
  document.getElementById("token-row").hidden = true;
});
poll();
