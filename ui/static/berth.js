// Behaviour that would otherwise be inline (hx-on), which the Content-Security-Policy forbids.
"use strict";

document.addEventListener("htmx:afterRequest", (event) => {
  const form = event.detail.elt;
  // A form marked data-reset-on-success is emptied once its request succeeded; a refused
  // one keeps what the user typed.
  if (event.detail.successful && form.matches && form.matches("form[data-reset-on-success]")) {
    form.reset();
  }
});

// The live stream resumes where the page is: when the SSE extension reconnects with a new
// EventSource (which carries no Last-Event-ID), it reads sse-connect again, so that says
// after which event to go on.
document.addEventListener("htmx:sseMessage", (event) => {
  const source = event.target.closest("[sse-connect]");
  const id = event.detail && event.detail.lastEventId;
  if (!source || !id) return;
  const url = new URL(source.getAttribute("sse-connect"), location.href);
  url.searchParams.set("after", id);
  source.setAttribute("sse-connect", url.pathname + url.search);
  source.dataset.seq = id;
});

// Bounded scrollback: lists marked data-keep="N" keep their newest N children.
const TRIM = (node) => {
  const keep = Number(node.dataset.keep);
  if (!keep) return;
  const newestFirst = node.id === "shots";
  while (node.childElementCount > keep) {
    (newestFirst ? node.lastElementChild : node.firstElementChild).remove();
  }
};

// Keeps the terminal and the timeline scrolled to their ends, unless the reader has
// scrolled up to read.
const FOLLOW = ["terminal", "log"];
const atEnd = {};
document.addEventListener("htmx:oobBeforeSwap", (event) => {
  const target = event.detail.target;
  if (target && FOLLOW.includes(target.id)) {
    atEnd[target.id] = target.scrollHeight - target.scrollTop - target.clientHeight < 40;
  }
});
document.addEventListener("htmx:oobAfterSwap", (event) => {
  const target = event.detail.target;
  if (!target) return;
  TRIM(target);
  if (FOLLOW.includes(target.id) && atEnd[target.id] !== false) {
    target.scrollTop = target.scrollHeight;
  }
});
document.addEventListener("DOMContentLoaded", () => {
  for (const id of FOLLOW) {
    const node = document.getElementById(id);
    if (node) node.scrollTop = node.scrollHeight;
  }
});

// A thumbnail shows its screenshot large (a click on the large one opens it full size).
document.addEventListener("click", (event) => {
  const thumb = event.target.closest("a[data-shot]");
  if (!thumb || event.ctrlKey || event.metaKey || event.shiftKey) return;
  const large = document.querySelector("#shot-large");
  if (!large) return;
  event.preventDefault();
  large.href = thumb.href;
  large.querySelector("img").src = thumb.href;
});

// Files dropped on the files panel are uploaded into the folder it shows (its upload form,
// sent by htmx with the dropped files in place of the chosen ones).
const FILES_PANEL = (event) => event.target.closest && event.target.closest("#files");
document.addEventListener("dragover", (event) => {
  const panel = FILES_PANEL(event);
  if (!panel || !panel.querySelector("form.upload")) return;
  event.preventDefault();
  panel.classList.add("dropping");
});
document.addEventListener("dragleave", (event) => {
  const panel = FILES_PANEL(event);
  if (panel) panel.classList.remove("dropping");
});
document.addEventListener("drop", (event) => {
  const panel = FILES_PANEL(event);
  const form = panel && panel.querySelector("form.upload");
  if (!form || !event.dataTransfer || !event.dataTransfer.files.length) return;
  event.preventDefault();
  panel.classList.remove("dropping");
  form.querySelector("input[type=file]").files = event.dataTransfer.files;
  htmx.process(form); // a panel swapped in a moment ago may not be processed yet
  htmx.trigger(form, "submit");
});
