// Behaviour that would otherwise be inline (hx-on), which the Content-Security-Policy forbids.
document.addEventListener("htmx:afterRequest", (event) => {
  const form = event.detail.elt;
  // A form marked data-reset-on-success is emptied once its request succeeded.
  if (event.detail.successful && form.matches && form.matches("form[data-reset-on-success]")) {
    form.reset();
  }
});
