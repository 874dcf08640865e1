"""status page."""
import streamlit as st
st.write('todo')
