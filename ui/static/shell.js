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
    socket.onmessage = (event) => term.write(new Uint8Array(event.data));
    socket.onclose = () => term.write("\r\n[disconnected: reload the page to reattach]\r\n");
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

  // The tabs running in the machine, once it has one to reach (asked again until then).
  async function start(root, bar) {
    let found = { tabs: [], ready: false };
    try {
      const answer = await fetch(`/ui/sessions/${root.dataset.sid}/terminals`);
      if (answer.ok) found = await answer.json();
    } catch (error) { /* asked again below */ }
    if (!found.ready) {
      setTimeout(() => start(root, bar), 3000);
      return;
    }
    const tabs = found.tabs.length ? found.tabs : [NAMES[0]];
    open(root, tabs[0]);
    drawTabs(bar, root, tabs);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const root = document.getElementById("shell");
    const bar = document.getElementById("shell-tabs");
    if (!root || !bar || typeof Terminal === "undefined") return;
    start(root, bar);
    window.addEventListener("resize", () => current && current.fit.fit());
  });
})();
