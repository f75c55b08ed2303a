// SPADE Monitor console: live updates of the camera grid from the server-sent event stream.
// Data is only ever written with textContent and attribute setters, never parsed as HTML.
(function () {
  "use strict";

  function setText(root, selector, text) {
    const node = root.querySelector(selector);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function newFromTemplate(id) {
    const template = document.getElementById(id);
    return template ? template.content.firstElementChild.cloneNode(true) : null;
  }

  function updateTile(grid, t) {
    let tile = document.getElementById("tile-" + t.camera);
    if (!tile) {  // a camera that appeared after the page was drawn
      tile = newFromTemplate("tile-template");
      if (!tile) return;
      tile.id = "tile-" + t.camera;
      tile.dataset.camera = t.camera;
      grid.appendChild(tile);
    }
    tile.classList.toggle("down", Boolean(t.down));
    setText(tile, ".camera", t.camera);
    setText(tile, ".scene", t.scene);
    const status = tile.querySelector(".status");
    if (status) status.dataset.status = t.status;
    setText(tile, ".status", t.status_text);
    setText(tile, ".detail", t.detail);
    setText(tile, ".fps", t.fps);
    setText(tile, ".drops", t.drops);
    setText(tile, ".score", t.score);
    const img = tile.querySelector("img.latest");
    if (img && img.getAttribute("src") !== t.image) img.setAttribute("src", t.image);
    tile.querySelectorAll("a.last-event, a.tile-image").forEach(function (link) {
      link.setAttribute("href", t.last_event_url);
    });
    setText(tile, ".last-event", t.last_event_text);
  }

  function fillEventRow(row, e) {
    row.dataset.eventId = e.event_id;
    row.dataset.start = String(e.start_ts);
    const link = row.querySelector("a.event-link");
    if (link) link.setAttribute("href", e.url);
    setText(row, ".ev-camera", e.camera);
    setText(row, ".ev-start", e.start);
    setText(row, ".ev-duration", e.duration);
    setText(row, ".ev-peak", e.peak);
    setText(row, ".ev-ratio", e.ratio);
    setText(row, ".ev-state", e.state);
    setText(row, ".ev-review", e.review);
  }

  function upsertEvent(list, e) {
    let row = null;
    list.querySelectorAll(".event-row").forEach(function (r) {
      if (r.dataset.eventId === e.event_id) row = r;
    });
    if (!row) {
      row = newFromTemplate("event-template");
      if (!row) return;
      fillEventRow(row, e);
      // Newest start first.
      const after = Array.from(list.children).find(function (r) { return Number(r.dataset.start) < e.start_ts; });
      list.insertBefore(row, after || null);
      const keep = Number(list.dataset.keep || 10);
      while (list.children.length > keep) list.removeChild(list.lastElementChild);
    } else {
      fillEventRow(row, e);
    }
  }

  function start() {
    const grid = document.getElementById("camera-grid");
    if (!grid || !window.EventSource) return;
    const list = document.getElementById("latest-events");
    const state = document.getElementById("stream-state");
    const source = new EventSource(grid.dataset.stream);
    source.addEventListener("open", function () { if (state) state.textContent = "live"; });
    source.addEventListener("error", function () { if (state) state.textContent = "reconnecting…"; });
    source.addEventListener("update", function (message) {
      const data = JSON.parse(message.data);
      (data.tiles || []).forEach(function (t) { updateTile(grid, t); });
      if (list) (data.events || []).forEach(function (e) { upsertEvent(list, e); });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
