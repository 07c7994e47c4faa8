"""Forms of the pages."""

from django import forms
from django.contrib.auth.forms import UserCreationForm

from agents_app.domain.selectors import team_list_enabled
from agents_app.models import Team


class SignUpForm(UserCreationForm):
    pass


class ConversationCreateForm(forms.Form):
    team = forms.ModelChoiceField(queryset=Team.objects.none(), required=False, empty_label=None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = team_list_enabled()
