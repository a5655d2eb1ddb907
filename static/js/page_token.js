// The API token a page was opened with, shared by the call page and the kiosk. It belongs in the URL
// fragment (page.html#token=...): browsers never send a fragment to a server, so the token stays out
// of access and proxy logs. A legacy ?token= in the query still works, but it is taken out of the
// address bar at once (and so out of bookmarks, history and the Referer of later requests), keeping
// the other parameters, and kept in this tab's sessionStorage under `storageKey` for a reload.

// Storage can be refused (an embedding page's site with storage blocked): then no memory.
function tabStorage() {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

export function tokenFromPageUrl(storageKey) {
  const storage = tabStorage();
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const query = new URLSearchParams(location.search);
  const legacy = query.get("token");
  if (query.has("token")) {
    query.delete("token");
    const search = query.toString();
    history.replaceState(history.state, "", `${location.pathname}${search ? `?${search}` : ""}${location.hash}`);
    if (legacy) storage?.setItem(storageKey, legacy);
  }
  return fragment.get("token") || legacy || storage?.getItem(storageKey) || "";
}
