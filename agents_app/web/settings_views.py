"""The person's settings pages: their personal API tokens (made, named, listed, revoked; a secret shown once)."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from agents_app.web import tokens


class ApiTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses it: “laptop script”, “CI”, “AG-UI front-end”.")
    read_only = forms.BooleanField(
        required=False, help_text="Reads conversations; cannot send, stop, rename or delete."
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the token a name.")
        return name


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request):
    """GET: the person's tokens. POST: a new one, whose secret this answer shows, once."""
    form = ApiTokenForm(request.POST or None)
    created = secret = None
    if request.method == "POST" and form.is_valid():
        created, secret = tokens.token_create(
            user=request.user, name=form.cleaned_data["name"], read_only=form.cleaned_data["read_only"]
        )
        form = ApiTokenForm()
    response = render(
        request,
        "agents_app/settings_tokens.html",
        {
            "form": form,
            "tokens": tokens.token_list_for_user(user=request.user),
            "created": created,
            "secret": secret,
            "settings_section": "tokens",
        },
    )
    # The secret exists only in this answer: no cache, proxy or back button may keep a copy.
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def api_token_revoke(request, token_id):
    token = tokens.token_revoke(user=request.user, token_id=token_id)
    if token is None:
        raise Http404("No such token.")
    messages.success(request, f"Revoked “{token.name}” ({token.prefix}…): programs using it are refused from now on.")
    return redirect("settings-tokens")
