// The session page's interactive shell: xterm.js tabs, each a WebSocket to a bash in the
// machine (ui/terminal.py). A reload reattaches to the tabs still running, with their recent
// output; "+" opens another.
"use strict";

(() => {
  const NAMES = "123456789".split("").map((n) => `t${n}`);
  let current = null; // {tab, term, socket, fit}

  function open(root, tab) {
    if (current) {
      current.socket.close();
      current.term.dispose();
    }
    root.replaceChildren();
    const term = new Terminal({ convertEol: false, scrollback: 5000, fontSize: 13 });
    const fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(root);
    fit.fit();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/ui/sessions/${root.dataset.sid}/terminal/${tab}` +
      `?cols=${term.cols}&rows=${term.rows}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    let opened = false;
    socket.onopen = () => { opened = true; };
    socket.onmessage = (event) => term.write(new Uint8Array(event.data));
    socket.onclose = () => {
      if (opened) {
        term.write("\r\n[disconnected: reload the page to reattach]\r\n");
      } else if (current && current.socket === socket) {
        // No machine yet (the session is starting): try again in a moment.
        setTimeout(() => { if (current && current.socket === socket) open(root, tab); }, 3000);
      }
    };
    term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ input: data }));
    });
    term.onResize(({ cols, rows }) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ resize: [cols, rows] }));
    });
    current = { tab, term, socket, fit };
    root.dataset.tab = tab;
    term.focus();
  }

  function drawTabs(bar, root, tabs) {
    bar.replaceChildren();
    for (const tab of tabs) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "small" + (current && current.tab === tab ? "" : " link");
      button.textContent = tab;
      button.setAttribute("role", "tab");
      button.dataset.tab = tab;
      button.addEventListener("click", () => { open(root, tab); drawTabs(bar, root, tabs); });
      bar.append(button);
    }
    const more = document.createElement("button");
    more.type = "button";
    more.className = "small link";
    more.textContent = "+ new tab";
    more.id = "shell-new-tab";
    more.addEventListener("click", () => {
      const next = NAMES.find((name) => !tabs.includes(name));
      if (!next) return;
      tabs.push(next);
      open(root, next);
      drawTabs(bar, root, tabs);
    });
    bar.append(more);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const root = document.getElementById("shell");
    const bar = document.getElementById("shell-tabs");
    if (!root || !bar || typeof Terminal === "undefined") return;
    let tabs = [];
    try {
      const answer = await fetch(`/ui/sessions/${root.dataset.sid}/terminals`);
      if (answer.ok) tabs = (await answer.json()).tabs;
    } catch (error) { /* no machine yet: one tab, started on open */ }
    if (!tabs.length) tabs = [NAMES[0]];
    open(root, tabs[0]);
    drawTabs(bar, root, tabs);
    window.addEventListener("resize", () => current && current.fit.fit());
  });
})();
