// The page's behaviour: send an image to /predict, then /explain, and show the answers.
// Plain JavaScript with nothing loaded from elsewhere. The routes are relative, so the page
// works wherever the service is mounted. document.body.dataset.state says what the page is
// doing ("busy", "done", "error"): screen readers get the status line, tests read this.
"use strict";

(() => {
  const CHANNELS_PER_PAGE = 16;
  const $ = (id) => document.getElementById(id);
  const png = (base64) => `data:image/png;base64,${base64}`;
  const percent = (probability) => `${(probability * 100).toFixed(1)}%`;

  let shown = null; // the File on display
  let photoUrl = null; // its object URL
  let explanation = null; // the last /explain answer
  let channelPage = 0;
  const sprites = new Map(); // stage name → its loaded thumbnail sheet

  function setState(state, status) {
    document.body.dataset.state = state;
    $("main").setAttribute("aria-busy", String(state === "busy"));
    $("status").textContent = status;
  }

  function showError(text) {
    $("message").textContent = text;
    $("message").hidden = false;
    setState("error", "");
  }

  // POST the image (and `fields`) to `route`; the decoded JSON answer, or an Error whose
  // message is the service's own reason.
  async function post(route, file, fields = {}) {
    const form = new FormData();
    form.append("image", file, file.name || "pasted-image");
    for (const [name, value] of Object.entries(fields)) form.append(name, value);
    let response;
    try {
      response = await fetch(route, {
        method: "POST",
        body: form,
        headers: { Accept: "application/json" },
      });
    } catch (error) {
      throw new Error(`/${route}: the service cannot be reached (${error.message})`);
    }
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: the reason is the text itself
    }
    if (!response.ok) {
      const reason = (body && body.error) || text.trim().slice(0, 300) || response.statusText;
      throw new Error(`/${route} answered ${response.status}: ${reason}`);
    }
    if (body === null) throw new Error(`/${route} answered something that is not JSON`);
    return body;
  }

  function showPrediction(answer) {
    $("label").textContent = answer.label;
    $("model").textContent = `Model ${answer.model}.`;
    const bars = answer.top_k.map(({ label, probability }) => {
      const item = document.createElement("li");
      item.dataset.label = label;
      item.dataset.probability = String(probability);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.style.width = percent(probability);
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(probability);
      item.append(name, bar, value);
      return item;
    });
    $("bars").replaceChildren(...bars);
    $("prediction").hidden = false;
  }

  function fillClassChoice(answer) {
    const byProbability = Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1]);
    const options = byProbability.map(([label, probability]) => {
      const option = new Option(`${label} (${percent(probability)})`, label);
      option.selected = label === answer.label;
      return option;
    });
    $("map-class").replaceChildren(...options);
  }

  function showMap(answer) {
    const heat = $("heat");
    const note = $("map-note");
    note.hidden = true;
    $("opacity").disabled = answer.heatmap == null;
    heat.hidden = answer.heatmap == null;
    if (answer.heatmap == null) {
      note.textContent = answer.map_unavailable;
      note.hidden = false;
    } else {
      heat.src = png(answer.heatmap);
    }
    const photo = $("photo");
    photo.onerror = () => {
      // A format this browser cannot show (TIFF): the service's own overlay instead.
      photo.onerror = null;
      if (answer.overlay == null) return;
      photo.src = png(answer.overlay);
      heat.hidden = true;
      $("opacity").disabled = true;
      note.textContent = "This browser cannot show the file: the service's overlay instead.";
      note.hidden = false;
    };
    photo.src = photoUrl;
    $("map").hidden = false;
  }

  function showStages(answer) {
    sprites.clear();
    const options = answer.stages.map((stage, index) => {
      const text = `${stage.name}: ${stage.channels} × ${stage.height} × ${stage.width}, stride ${stage.stride}`;
      return new Option(text, String(index));
    });
    $("stage").replaceChildren(...options);
    channelPage = 0;
    $("features").hidden = answer.stages.length === 0;
    if (answer.stages.length > 0) showChannels();
  }

  function sprite(stage) {
    if (!sprites.has(stage.name)) {
      const image = new Image();
      image.src = png(stage.tiles.png);
      sprites.set(stage.name, image.decode().then(() => image));
    }
    return sprites.get(stage.name);
  }

  function showChannels() {
    drawChannels().catch((error) => showError(`The feature maps cannot be shown: ${error.message}`));
  }

  async function drawChannels() {
    const stage = explanation.stages[Number($("stage").value)];
    const pages = Math.ceil(stage.channels / CHANNELS_PER_PAGE);
    channelPage = Math.min(Math.max(channelPage, 0), pages - 1);
    const first = channelPage * CHANNELS_PER_PAGE;
    const last = Math.min(first + CHANNELS_PER_PAGE, stage.channels);
    $("previous").disabled = channelPage === 0;
    $("next").disabled = channelPage === pages - 1;
    $("page").textContent = `Channels ${first + 1}–${last} of ${stage.channels} (page ${channelPage + 1} of ${pages}).`;
    const sheet = await sprite(stage);
    const { columns, tile_width: width, tile_height: height } = stage.tiles;
    const tiles = [];
    for (let index = first; index < last; index += 1) {
      const canvas = document.createElement("canvas");
      canvas.width = width;
      canvas.height = height;
      const x = (index % columns) * width;
      const y = Math.floor(index / columns) * height;
      canvas.getContext("2d").drawImage(sheet, x, y, width, height, 0, 0, width, height);
      const channel = stage.tiles.channels[index];
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `feature map of channel ${channel}`);
      const figure = document.createElement("figure");
      const caption = document.createElement("figcaption");
      caption.textContent = `channel ${channel}`;
      figure.append(canvas, caption);
      tiles.push(figure);
    }
    $("grid").replaceChildren(...tiles);
  }

  async function explain(file, className) {
    setState("busy", "Computing the activation map and feature maps…");
    const fields = className == null ? {} : { class: className };
    explanation = await post("explain", file, fields);
    if (file !== shown) return; // another image was chosen meanwhile
    showMap(explanation);
    if (className == null) {
      fillClassChoice(explanation);
      showStages(explanation);
    }
    setState("done", `Done: ${explanation.label}.`);
  }

  async function show(file) {
    shown = file;
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    $("message").hidden = true;
    for (const id of ["prediction", "map", "features"]) $(id).hidden = true;
    try {
      setState("busy", `Classifying ${file.name || "the pasted image"}…`);
      const prediction = await post("predict", file);
      if (file !== shown) return;
      showPrediction(prediction);
      await explain(file, null);
    } catch (error) {
      if (file === shown) showError(error.message);
    }
  }

  function firstImage(files) {
    return files && files.length > 0 ? files[0] : null;
  }

  function start() {
    $("file").addEventListener("change", (event) => {
      const file = firstImage(event.target.files);
      if (file) show(file);
    });
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      $("drop").classList.add("over");
    });
    document.addEventListener("dragleave", () => $("drop").classList.remove("over"));
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      $("drop").classList.remove("over");
      const file = firstImage(event.dataTransfer.files);
      if (file) show(file);
      else showError("Drop an image file (a link or text is not an image).");
    });
    document.addEventListener("paste", (event) => {
      const file = firstImage(event.clipboardData.files);
      if (file) show(file);
    });
    $("opacity").addEventListener("input", () => {
      const value = Number($("opacity").value);
      $("heat").style.opacity = String(value / 100);
      $("opacity-value").textContent = `${value}%`;
    });
    $("map-class").addEventListener("change", () => {
      explain(shown, $("map-class").value).catch((error) => showError(error.message));
    });
    $("stage").addEventListener("change", () => {
      channelPage = 0;
      showChannels();
    });
    $("previous").addEventListener("click", () => {
      channelPage -= 1;
      showChannels();
    });
    $("next").addEventListener("click", () => {
      channelPage += 1;
      showChannels();
    });
    $("heat").style.opacity = String(Number($("opacity").value) / 100);
  }

  start();
})();
